"""Each rank's peak memory under collie-compile plans, beside the planner's estimate
(used by ``python -m benchmarks estimate``; launched as a script under torchrun).

For every plan: build it with ``parallelize``, then run two training steps under
:class:`collie_compile.cost.measure.LiveBytes` (MemTracker refuses a module run several
times in a step, as micro-batches do), told of every stage's weights so that what was
made before it started counts too. Rank 0 writes, per plan, every rank's peak and the
estimate of the fullest GPU and of each pipeline stage.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from train_worker import ADAMW, SHAPE, batches, model

STEPS = 2


def tracked_peak(pins: dict, data: list[torch.Tensor]) -> dict:
    from collie_compile.cost.measure import LiveBytes
    from collie_compile.runtime.parallel_model import parallelize

    pm = parallelize(model(), seq_len=SHAPE["seq"], global_batch_size=SHAPE["global_batch"],
                     optimizer="adamw", lr=ADAMW["lr"], **pins)
    live = LiveBytes()
    live.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    with live:
        for ids in data[:STEPS]:
            pm.train_step({"input_ids": ids})
    peak = torch.tensor([float(live.peak)])
    peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    c = pm.chosen
    return {"pins": pins, "layout": c.layout_str(), "peak_bytes": [int(p) for p in peaks],
            "estimated_bytes": c.memory_per_gpu_bytes,
            "stage_estimates": [m.get("total_bytes") for m in c.memory]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", required=True, help="JSON list of plan pins")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from collie_compile.runtime.distributed import ensure_initialized

    ensure_initialized()
    data = batches(STEPS, 8192)
    results = [tracked_peak(pins, data) for pins in json.loads(args.plans)]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
