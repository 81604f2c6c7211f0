"""collie-compile beside DDP, FSDP2 and DeepSpeed ZeRO-2/3 on one machine.

The same model (small-llama, 15.7M parameters), data, world size and global batch,
AdamW, fp32. Each framework runs in its own torchrun launch (4 ranks: gloo on CPU, NCCL
where GPUs are present), so peak memory is each process's own. collie-compile's
dp-only plan and DDP run ``--repeats`` times, alternating, to see past machine noise;
tokens/s is the median step's. They also run in one launch, built side by side in each
process and stepping in turn, for a ratio that machine noise hits alike.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from tqdm import tqdm

from .report import LaunchError, Report, launch, table
from .train_worker import INTERLEAVED

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ["collie-auto", "fsdp2", "deepspeed-2", "deepspeed-3"]
REPEATED = ["collie-dp", "ddp"]


def run(framework: str, nproc: int, steps: int, measure: str = "time") -> dict:
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return launch("train_worker.py", nproc, ["--framework", framework, "--steps",
                                                 str(steps), "--measure", measure], env)
    except LaunchError as e:
        return {"framework": framework, "error": str(e).strip().splitlines()[-1:]}


def main(out: str | None = None, nproc: int = 4, steps: int = 10, repeats: int = 5) -> None:
    rep = Report("train", out)
    runs: dict[str, list[dict]] = {}
    order = [fw for _ in range(repeats) for fw in REPEATED] + FRAMEWORKS
    memory: dict[str, dict] = {}
    for fw in tqdm(order + REPEATED + FRAMEWORKS + [INTERLEAVED], desc="launches"):
        if fw == INTERLEAVED:
            paired = run(fw, nproc, 2 * steps)
        elif len(runs.get(fw, [])) < order.count(fw):
            runs.setdefault(fw, []).append(run(fw, nproc, steps))
        else:
            memory[fw] = run(fw, nproc, 2, "memory")
    base = statistics.median(r["tokens_per_s"] for r in runs["collie-dp"] if "error" not in r)
    rows, bars = [], []
    for fw in REPEATED + FRAMEWORKS:
        ok = [r for r in runs[fw] if "error" not in r]
        if not ok:
            rows.append([fw, "failed: " + " ".join(runs[fw][0]["error"]), "", "", "", ""])
            continue
        tps = statistics.median(r["tokens_per_s"] for r in ok)
        each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in ok)
        peak = max(memory[fw].get("peak_mib", [float("nan")]))
        rows.append([fw, ok[0]["layout"], f"{tps:.0f}", each, f"{base / tps:.2f}",
                     f"{peak:.0f}"])
        bars.append((fw, tps, peak))
    rep.add(f"small-llama (15.7M parameters), fp32 AdamW, {nproc} ranks, global batch 8 x 128,"
            f" median of {steps} steps after 2 warm-up\n\n" + table(
                ["framework", "layout", "tokens/s", "each run", "step time ÷ collie-dp's",
                 "peak MiB / rank"], rows, right=(2, 4, 5)))
    pairs = [c["step_s"] / d["step_s"] for c, d in zip(runs["collie-dp"], runs["ddp"])
             if "error" not in c and "error" not in d]
    if pairs:
        rep.add(f"collie-compile dp-only step time ÷ DDP's, run by run (each pair launched "
                f"back to back): {', '.join(f'{r:.3f}' for r in pairs)}; median "
                f"{statistics.median(pairs):.3f}.")
    if "error" in paired:
        rep.add(f"The paired launch failed: {' '.join(paired['error'])}")
    else:
        c, d = paired["step_s"]["collie-dp"], paired["step_s"]["ddp"]
        ratios = [a / b for a, b in zip(c, d)]
        rep.add(f"Paired in one launch ({len(c)} steps each, the two stepping in turn): "
                f"collie-compile dp-only {statistics.median(c):.3f} s per step, DDP "
                f"{statistics.median(d):.3f} s; ratio of the medians "
                f"{statistics.median(c) / statistics.median(d):.3f}, median of the "
                f"step-by-step ratios {statistics.median(ratios):.3f} (from "
                f"{min(ratios):.2f} to {max(ratios):.2f}).")
    rep.add("Peak MiB: the largest growth of a rank's anonymous resident memory during "
            "training steps over its size before the model existed (weights, gradients, "
            "optimizer states, activations, communication buffers), from a separate launch.")
    rep.plot("train_throughput", lambda ax: (
        ax.bar([b[0] for b in bars], [b[1] for b in bars]), ax.set_ylabel("tokens/s"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    rep.plot("train_memory", lambda ax: (
        ax.bar([b[0] for b in bars], [b[2] for b in bars]), ax.set_ylabel("peak MiB per rank"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    rep.save()
