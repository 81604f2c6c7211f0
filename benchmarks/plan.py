"""Planner solve time against model size and GPU count (h100-80gb, bf16, AdamW).

``capture`` is the one-off two-block probe (torch.export + fake-tensor measurement);
``solve`` is the search itself: enumeration, per-stage tables and the CBC ILPs.
"""

from __future__ import annotations

import platform
import time

import torch

from collie_compile.modelprofile import profile_model
from collie_compile.planner import plan

MODELS = [("gpt2", 1024), ("llama-2-7b", 4096), ("llama-2-13b", 4096), ("llama-2-70b", 4096),
          ("llama-3.1-405b", 8192)]
GPUS = [8, 64, 1024]


def main() -> None:
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, CPU only\n")
    print("| model | seq | GPUs | capture s | solve s | feasible | plan | MFU |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for model, seq in MODELS:
        t0 = time.perf_counter()
        profile_model(model, seq_len=seq, dtype="bf16")
        capture = time.perf_counter() - t0
        for gpus in GPUS:
            t0 = time.perf_counter()
            p = plan(model, gpus=gpus, gpu="h100-80gb", seq_len=seq)
            solve = time.perf_counter() - t0
            c = p.chosen
            what = (f"dp={c.dp} tp={c.tp} pp={c.pp} zero={c.zero} mb={c.micro_batch_size}"
                    f" {c.schedule}")
            print(f"| {model} | {seq} | {gpus} | {capture:.1f} | {solve:.2f} | "
                  f"{'yes' if p.feasible else 'no'} | {what} | {100 * c.mfu:.1f}% |",
                  flush=True)
            capture = 0.0


if __name__ == "__main__":
    main()
