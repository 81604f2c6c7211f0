"""collie-compile beside DDP, FSDP2 and DeepSpeed ZeRO-2/3 on one machine.

The same model (small-llama, 15.7M parameters), data, world size and global batch,
AdamW, fp32. Time: every framework is built side by side in each rank of one torchrun
launch (gloo on CPU, NCCL where GPUs are present) and they step in turn, so that the
machine's drift over minutes meets all of them alike; ``--repeats`` such launches.
tokens/s is from the median step over all launches. Memory: each framework in a launch
of its own, so that the peak is its process's.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from tqdm import tqdm

from .report import LaunchError, Report, launch, table

FRAMEWORKS = ["collie-dp", "ddp", "collie-auto", "fsdp2", "deepspeed-2", "deepspeed-3"]


def run(frameworks: list[str], nproc: int, steps: int, measure: str = "time") -> dict:
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return launch("train_worker.py", nproc, ["--framework", ",".join(frameworks),
                                                 "--steps", str(steps), "--measure", measure],
                      env)
    except LaunchError as e:
        return {"error": str(e).strip().splitlines()[-1:]}


def main(out: str | None = None, nproc: int = 4, steps: int = 20, repeats: int = 3) -> None:
    rep = Report("train", out)
    launches = [run(FRAMEWORKS, nproc, steps) for _ in tqdm(range(repeats), desc="time")]
    memory = {fw: run([fw], nproc, 2, "memory") for fw in tqdm(FRAMEWORKS, desc="memory")}
    ok = [r for r in launches if "error" not in r]
    if not ok:
        raise SystemExit("every timed launch failed: " + " ".join(launches[0]["error"]))
    shape = ok[0]["shape"]
    tokens = shape["global_batch"] * shape["seq"]
    median = {fw: statistics.median(t for r in ok for t in r["step_s"][fw]) for fw in FRAMEWORKS}
    rows, bars = [], []
    for fw in FRAMEWORKS:
        each = ", ".join(f"{tokens / statistics.median(r['step_s'][fw]):.0f}" for r in ok)
        peak = max(memory[fw].get("peak_mib", [float("nan")]))
        rows.append([fw, ok[0]["layout"][fw], f"{tokens / median[fw]:.0f}", each,
                     f"{median[fw] / median['collie-dp']:.2f}", f"{peak:.0f}"])
        bars.append((fw, tokens / median[fw], peak))
    rep.add(f"small-llama (15.7M parameters), fp32 AdamW, {nproc} ranks, global batch "
            f"{shape['global_batch']} x {shape['seq']}; {len(ok)} launches, each "
            f"stepping all frameworks in turn {steps} times after 2 warm-up rounds; tokens/s "
            f"from the median step of all launches\n\n" + table(
                ["framework", "layout", "tokens/s", "each launch", "step time ÷ collie-dp's",
                 "peak MiB / rank"], rows, right=(2, 4, 5)))
    def paired(r: dict) -> list[float]:  # collie-dp's step over DDP's in the same round
        return [c / d for c, d in zip(r["step_s"]["collie-dp"], r["step_s"]["ddp"])]

    every = [x for r in ok for x in paired(r)]
    per_launch = ", ".join(f"{statistics.median(paired(r)):.3f}" for r in ok)
    rep.add(f"collie-compile dp-only step time ÷ DDP's, from the two steps taken in the same "
            f"round: median per launch {per_launch}; over all {len(every)} rounds "
            f"{statistics.median(every):.3f} (single rounds range from {min(every):.2f} to "
            f"{max(every):.2f}).")
    failed = [" ".join(r["error"]) for r in launches if "error" in r]
    failed += [f"{fw}: {' '.join(m['error'])}" for fw, m in memory.items() if "error" in m]
    if failed:
        rep.add("Failed launches: " + "; ".join(failed))
    rep.add("Peak MiB: the largest growth of a rank's anonymous resident memory during "
            "training steps over its size before the model existed (weights, gradients, "
            "optimizer states, activations, communication buffers), from a separate launch.")
    rep.plot("train_throughput", lambda ax: (
        ax.bar([b[0] for b in bars], [b[1] for b in bars]), ax.set_ylabel("tokens/s"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    rep.plot("train_memory", lambda ax: (
        ax.bar([b[0] for b in bars], [b[2] for b in bars]), ax.set_ylabel("peak MiB per rank"),
        ax.set_title(f"small-llama, {nproc} ranks")))
    if out:
        Path(out, "train.json").write_text(json.dumps(dict(time=launches, memory=memory),
                                                      indent=1))
    rep.save()
