"""Planner solve time against model size and GPU count (h100-80gb, bf16, AdamW).

``capture`` is the one-off two-block probe (torch.export + fake-tensor measurement);
``solve`` is the search itself: enumeration, per-stage tables and the CBC ILPs.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from collie_compile.cost.profile import profile_model
from collie_compile.planner.search import plan

from .report import Report, table

MODELS = [("gpt2", 1024), ("llama-2-7b", 4096), ("llama-2-13b", 4096), ("llama-2-70b", 4096),
          ("llama-3.1-405b", 8192)]
GPUS = [8, 64, 1024]


def main(out: str | None = None) -> None:
    rep = Report("plan", out)
    rows, solves = [], {}
    for model, seq in tqdm(MODELS, desc="models"):
        t0 = time.perf_counter()
        profile_model(model, seq_len=seq, dtype="bf16")
        capture = time.perf_counter() - t0
        for gpus in GPUS:
            t0 = time.perf_counter()
            p = plan(model, gpus=gpus, gpu="h100-80gb", seq_len=seq)
            solve = time.perf_counter() - t0
            solves.setdefault(model, []).append(solve)
            c = p.chosen
            what = (f"dp={c.dp} tp={c.tp} pp={c.pp} zero={c.zero} mb={c.micro_batch_size}"
                    f" {c.schedule}")
            rows.append([model, seq, gpus, f"{capture:.1f}", f"{solve:.2f}",
                         "yes" if p.feasible else "no", what, f"{100 * c.mfu:.1f}%"])
            capture = 0.0
    rep.add(table(["model", "seq", "GPUs", "capture s", "solve s", "feasible", "plan", "MFU"],
                  rows, right=(1, 2, 3, 4, 7)))

    def draw(ax: object) -> None:
        for model, times in solves.items():
            ax.plot(GPUS, times, marker="o", label=model)
        ax.set_xscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("solve s")
        ax.legend()
        ax.set_title("planner solve time (h100-80gb, bf16, AdamW)")

    rep.plot("plan_solve_time", draw)
    rep.save()
