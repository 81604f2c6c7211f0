"""Estimated vs measured peak memory of single-process CPU training steps.

The estimate comes from the cost model (graph-measured activations, analytic model
states); the measurement from torch's MemTracker on a real training step.
"""

from __future__ import annotations

import platform

import torch

from collie_compile.measure import measure_peak
from collie_compile.memory import Layout, MemoryModel
from collie_compile.modelprofile import profile_model
from collie_compile.optimizers import get_optimizer

CASES = [  # model, optimizer, recompute, dtype, micro-batch, seq
    ("small-llama", "adamw", "none", "fp32", 2, 256),
    ("small-llama", "adamw", "full", "fp32", 2, 256),
    ("small-llama", "adam", "selective", "fp32", 4, 256),
    ("small-llama", "sgd", "selective", "fp32", 4, 256),
    ("small-llama", "lion", "none", "fp32", 2, 256),
    ("small-llama", "lomo", "full", "fp32", 2, 256),
    ("small-llama", "lomo", "none", "fp32", 8, 256),
    ("small-llama", "lomo", "none", "bf16", 2, 128),
    ("small-llama", "lion", "selective", "bf16", 2, 128),
    ("small-llama", "adalomo", "full", "fp32", 2, 256),
    ("small-llama", "adalomo", "none", "fp32", 2, 256),
    ("tiny-gpt2", "adamw", "none", "fp32", 8, 128),
    ("tiny-qwen2", "lion", "full", "fp32", 8, 128),
]


def run() -> list[dict]:
    rows = []
    for model, opt, rc, dtype, b, s in CASES:
        measured = measure_peak(model, opt, rc, dtype, b, s)
        est = MemoryModel(profile_model(model, seq_len=s, dtype=dtype),
                          get_optimizer(opt)).estimate(
            Layout(micro_batch_size=b, seq_len=s, recompute=rc))
        rows.append(dict(model=model, optimizer=opt, recompute=rc, dtype=dtype, batch=b, seq=s,
                         measured=measured.total_bytes, estimated=est.total_bytes,
                         error=est.total_bytes / measured.total_bytes - 1))
    return rows


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n")
    print("| model | optimizer | recompute | dtype | batch x seq | measured MiB | "
          "estimated MiB | error |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in run():
        print(f"| {r['model']} | {r['optimizer']} | {r['recompute']} | {r['dtype']} | "
              f"{r['batch']} x {r['seq']} | {r['measured'] / 2**20:.1f} | "
              f"{r['estimated'] / 2**20:.1f} | {100 * r['error']:+.1f}% |")


if __name__ == "__main__":
    main()
