"""Estimated vs measured peak memory: single-process steps, then each rank of parallel plans.

The estimate comes from the cost model (graph-measured activations, analytic model
states); the measurement from a real training step: torch's MemTracker on the CPU, or
the caching allocator's ``max_memory_allocated`` where CUDA is present. The parallel
part (CPU only: 4 gloo ranks) runs collie-compile plans of small-llama under MemTracker
on every rank and compares each rank with the estimate for its pipeline stage.
"""

from __future__ import annotations

import json

import torch
from tqdm import tqdm

from collie_compile.cost.measure import measure_peak
from collie_compile.cost.memory import Layout, MemoryModel
from collie_compile.cost.profile import profile_model
from collie_compile.dtypes import torch_dtype
from collie_compile.models.attention import fused_gqa
from collie_compile.optim.specs import get_optimizer

from .report import Report, launch, table

CASES = [  # model, optimizer, recompute, dtype, micro-batch, seq
    ("small-llama", "adamw", "none", "fp32", 2, 256),
    ("small-llama", "adamw", "full", "fp32", 2, 256),
    ("small-llama", "adam", "selective", "fp32", 4, 256),
    ("small-llama", "sgd", "selective", "fp32", 4, 256),
    ("small-llama", "lion", "none", "fp32", 2, 256),
    ("small-llama", "adan", "none", "fp32", 2, 256),
    ("small-llama", "sophia", "selective", "fp32", 2, 256),
    ("small-llama", "lomo", "full", "fp32", 2, 256),
    ("small-llama", "lomo", "none", "fp32", 8, 256),
    ("small-llama", "lomo", "none", "bf16", 2, 128),
    ("small-llama", "adamw", "none", "bf16", 2, 128),
    ("small-llama", "lion", "selective", "bf16", 2, 128),
    ("small-llama", "adalomo", "full", "fp32", 2, 256),
    ("small-llama", "adalomo", "none", "fp32", 2, 256),
    ("tiny-gpt2", "adamw", "none", "fp32", 8, 128),
    ("tiny-qwen2", "lion", "full", "fp32", 8, 128),
]


RANKS = 4
LAYOUTS = [  # small-llama (6 blocks, 6 heads, 2 KV heads), 4 ranks, global batch 8 x 128
    dict(dp=4, tp=1, pp=1, zero=0, recompute="none"),
    dict(dp=4, tp=1, pp=1, zero=1, recompute="none"),
    dict(dp=4, tp=1, pp=1, zero=2, recompute="none"),
    dict(dp=4, tp=1, pp=1, zero=3, recompute="none"),
    dict(dp=2, tp=2, pp=1, zero=0, recompute="selective"),
    dict(dp=2, tp=1, pp=2, zero=0, recompute="none", schedule="1f1b"),
    dict(dp=1, tp=2, pp=2, zero=0, recompute="full", schedule="gpipe"),
    dict(dp=1, tp=1, pp=4, zero=0, recompute="none", schedule="1f1b", micro_batch_size=2),
    dict(dp=2, tp=1, pp=2, zero=0, recompute="none", schedule="interleaved",
         micro_batch_size=1),
    # ZeRO-2/3 over several micro-batches: sharded gradients without pp; whole ones under
    # pp (torch.distributed.pipelining syncs FSDP2 once, after the last backward)
    dict(dp=4, tp=1, pp=1, zero=3, recompute="none", micro_batch_size=1),
    dict(dp=2, tp=1, pp=2, zero=3, recompute="none", schedule="1f1b", micro_batch_size=1),
    dict(dp=2, tp=1, pp=2, zero=2, recompute="none", schedule="1f1b", micro_batch_size=2),
]


def run_parallel() -> list[dict]:
    """One torchrun launch of ``memory_worker.py`` over every layout; a row per rank."""
    print(f"running {len(LAYOUTS)} layouts on {RANKS} ranks ...", flush=True)
    runs = launch("memory_worker.py", RANKS, ["--plans", json.dumps(LAYOUTS)])
    rows = []
    for r in runs:
        per_stage = RANKS // len(r["stage_estimates"])  # ranks per pipeline stage
        for rank, peak in enumerate(r["peak_bytes"]):
            est = r["stage_estimates"][rank // per_stage]
            rows.append(dict(layout=r["layout"], rank=rank, measured=peak, estimated=est,
                             error=est / peak - 1))
    return rows


def run(device: str) -> list[dict]:
    rows = []
    for model, opt, rc, dtype, b, s in tqdm(CASES, desc="cases"):
        measured = measure_peak(model, opt, rc, dtype, b, s, device=device)
        expanded = not fused_gqa(torch.device(device), torch_dtype(dtype))
        est = MemoryModel(profile_model(model, seq_len=s, dtype=dtype), get_optimizer(opt),
                          expanded_kv=expanded).estimate(
            Layout(micro_batch_size=b, seq_len=s, recompute=rc))
        rows.append(dict(model=model, optimizer=opt, recompute=rc, dtype=dtype, batch=b, seq=s,
                         measured=measured.total_bytes, estimated=est.total_bytes,
                         error=est.total_bytes / measured.total_bytes - 1))
    return rows


def main(out: str | None = None) -> None:
    rep = Report("estimate", out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    how = ("max_memory_allocated on " + torch.cuda.get_device_name() if device == "cuda"
           else "MemTracker on the CPU")
    rows = run(device)
    rep.add(f"One process, measured by {how}\n\n" + table(
        ["model", "optimizer", "recompute", "dtype", "batch x seq", "measured MiB",
         "estimated MiB", "error"],
        [[r["model"], r["optimizer"], r["recompute"], r["dtype"], f"{r['batch']} x {r['seq']}",
          f"{r['measured'] / 2**20:.1f}", f"{r['estimated'] / 2**20:.1f}",
          f"{100 * r['error']:+.1f}%"] for r in rows], right=(5, 6, 7)))
    rep.plot("estimate", lambda ax: (
        ax.scatter([r["measured"] / 2**20 for r in rows], [r["estimated"] / 2**20 for r in rows]),
        ax.axline((0, 0), slope=1, color="gray", linestyle="--"),
        ax.set_xlabel(f"measured MiB ({how})"), ax.set_ylabel("estimated MiB"),
        ax.set_title("peak memory, single-process training steps")))
    if device == "cpu":
        par = run_parallel()
        rep.add(f"Each rank of {RANKS} gloo ranks, small-llama, fp32 AdamW, global batch "
                "8 x 128, measured on every rank (live tensor bytes, `LiveBytes`)\n\n" + table(
                    ["layout", "rank", "measured MiB", "estimated MiB", "error"],
                    [[r["layout"], r["rank"], f"{r['measured'] / 2**20:.1f}",
                      f"{r['estimated'] / 2**20:.1f}", f"{100 * r['error']:+.1f}%"]
                     for r in par], right=(1, 2, 3, 4)))
        worst = max(par, key=lambda r: abs(r["error"]))
        rep.add(f"Largest error over {len(par)} ranks: {100 * worst['error']:+.1f}% "
                f"({worst['layout']}, rank {worst['rank']}).")
    rep.save()
