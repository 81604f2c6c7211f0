"""collie-compile beside DDP, FSDP2 and DeepSpeed ZeRO-2/3 on one machine.

The same model (small-llama, 15.7M parameters), data, world size and global batch,
AdamW, fp32. Each framework runs in its own torchrun launch (4 ranks: gloo on CPU, NCCL
where GPUs are present), so peak memory is each process's own. collie-compile's
dp-only plan and DDP run ``--repeats`` times, alternating, to see past machine noise;
tokens/s is the median step's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from .report import Report, table

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ["collie-auto", "fsdp2", "deepspeed-2", "deepspeed-3"]
REPEATED = ["collie-dp", "ddp"]


def launch(framework: str, nproc: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"{framework}-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "benchmarks" / "train_worker.py"),
           "--framework", framework, "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get(
        "DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"framework": framework, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(out.read_text())


def main(out: str | None = None, nproc: int = 4, steps: int = 8, repeats: int = 3) -> None:
    rep = Report("train", out)
    runs: dict[str, list[dict]] = {}
    order = [fw for _ in range(repeats) for fw in REPEATED] + FRAMEWORKS
    with tempfile.TemporaryDirectory() as tmp:
        for fw in tqdm(order, desc="launches"):
            runs.setdefault(fw, []).append(launch(fw, nproc, steps, Path(tmp)))
    base = statistics.median(r["tokens_per_s"] for r in runs["collie-dp"] if "error" not in r)
    rows, bars = [], []
    for fw in REPEATED + FRAMEWORKS:
        ok = [r for r in runs[fw] if "error" not in r]
        if not ok:
            rows.append([fw, "failed: " + " ".join(runs[fw][0]["error"]), "", "", "", ""])
            continue
        tps = statistics.median(r["tokens_per_s"] for r in ok)
        each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in ok)
        peak = max(max(r["peak_mib"]) for r in ok)
        rows.append([fw, ok[0]["layout"], f"{tps:.0f}", each, f"{base / tps:.2f}",
                     f"{peak:.0f}"])
        bars.append((fw, tps, peak))
    rep.add(f"small-llama (15.7M parameters), fp32 AdamW, {nproc} ranks, global batch 8 x 128,"
            f" median of {steps} steps after 2 warm-up\n\n" + table(
                ["framework", "layout", "tokens/s", "each run", "collie-dp time ratio",
                 "peak MiB / rank"], rows, right=(2, 4, 5)))
    rep.add("time ratio = collie-compile dp-only tokens/s ÷ this framework's (< 1: "
            "collie-compile is slower). Peak MiB: largest resident-memory growth of a rank "
            "over its start (weights, gradients, optimizer states, activations, buffers).")
    rep.plot("train_throughput", lambda ax: (
        ax.bar([b[0] for b in bars], [b[1] for b in bars]), ax.set_ylabel("tokens/s"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    rep.plot("train_memory", lambda ax: (
        ax.bar([b[0] for b in bars], [b[2] for b in bars]), ax.set_ylabel("peak MiB per rank"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    rep.save()
