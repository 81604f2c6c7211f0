"""Does the cost model order plans as reality does? Modeled against measured step time.

The hardware spec comes from ``calibrate`` on this machine (matmul rate, copy bandwidth,
per-op overhead, a collective's latency and bandwidth). On a CPU the runs put ``nproc``
ranks (one thread each; by default one per core, at most 4) on the machine, so a rank
gets cores/nproc of a core: the measured compute and memory rates are scaled by that
share before planning. With CUDA, one rank per GPU; on a single GPU the plans differ in
micro-batching and recomputation, at a larger batch (32 x 512) so that both launch
overhead and compute matter. Each plan of small-llama is priced by the planner
(everything pinned) and run by ``parallelize``, all plans built side by side in one
torchrun launch and stepping in turn (so that the machine's drift meets them alike);
the table gives both times and the Spearman rank correlation between them. With
``--out``, the spec, the pins and every measured step go to ``fidelity.json`` too, to
price again later.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from collie_compile.cost.calibrate import calibrate
from collie_compile.planner.search import plan

from .report import Report, launch, table
from .train_worker import MODEL, SHAPE

PLANS_2 = [  # one rank per core on a 2-core machine
    dict(dp=2, tp=1, pp=1, zero=0, recompute="none"),
    dict(dp=2, tp=1, pp=1, zero=0, recompute="full"),
    dict(dp=2, tp=1, pp=1, zero=0, recompute="selective"),
    dict(dp=2, tp=1, pp=1, zero=3, recompute="none"),
    dict(dp=1, tp=2, pp=1, zero=0, recompute="none"),
    dict(dp=1, tp=2, pp=1, zero=0, recompute="full"),
    dict(dp=1, tp=1, pp=2, zero=0, recompute="none", schedule="1f1b", micro_batch_size=1),
    dict(dp=1, tp=1, pp=2, zero=0, recompute="none", schedule="gpipe", micro_batch_size=4),
]
PLANS_1 = [  # one GPU: from launch-bound (32 micro-batches of 1) to compute-bound
    dict(micro_batch_size=b, recompute=r)
    for b, r in [(1, "none"), (4, "none"), (16, "none"), (32, "none"), (4, "full"),
                 (32, "full"), (4, "selective"), (32, "selective")]
]
GPU_SHAPE = {"seq": 512, "global_batch": 32}
PLANS_4 = [  # small-llama: 6 blocks, 6 heads (2 KV heads): tp up to 2
    dict(dp=4, tp=1, pp=1, zero=0, recompute="none"),
    dict(dp=4, tp=1, pp=1, zero=0, recompute="full"),
    dict(dp=4, tp=1, pp=1, zero=3, recompute="none"),
    dict(dp=2, tp=2, pp=1, zero=0, recompute="none"),
    dict(dp=2, tp=2, pp=1, zero=0, recompute="selective"),
    dict(dp=2, tp=1, pp=2, zero=0, recompute="none", schedule="1f1b"),
    dict(dp=1, tp=2, pp=2, zero=0, recompute="none", schedule="1f1b"),
    dict(dp=1, tp=1, pp=4, zero=0, recompute="none", schedule="1f1b", micro_batch_size=2),
]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected in measured times)."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        for i, k in enumerate(order):
            r[k] = float(i)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1 - 6 * d2 / (n * (n * n - 1))


def cpu_spec(nproc: int) -> object:
    """This machine, calibrated, with compute and memory rates scaled to one rank's share."""
    spec = calibrate(name="this-cpu")
    share = min(1.0, (os.cpu_count() or 1) / nproc) / torch.get_num_threads()
    return dataclasses.replace(spec, bf16_flops=spec.bf16_flops * share,
                               fp16_flops=spec.fp16_flops * share,
                               fp32_flops=spec.fp32_flops * share,
                               hbm_bandwidth=spec.hbm_bandwidth * share)


def modeled(spec: object, pins: dict, nproc: int, shape: dict) -> float:
    single = dict(dp=1, tp=1, pp=1, zero=0) if nproc == 1 else {}
    p = plan(MODEL, gpus=nproc, gpu=spec, seq_len=shape["seq"],
             global_batch_size=shape["global_batch"], optimizer="adamw", dtype="fp32",
             **single, **pins)
    return p.chosen.step_time_s


def measure(plans: list[dict], nproc: int, shape: dict, steps: int) -> list[dict]:
    """Run every plan in one torchrun launch; the worker's per-plan results."""
    print(f"running {len(plans)} plans on {nproc} ranks ...", flush=True)
    return launch("train_worker.py", nproc, [
        "--framework", "collie-pinned", "--steps", str(steps), "--seq", str(shape["seq"]),
        "--global-batch", str(shape["global_batch"]), "--plans", json.dumps(plans)])


def main(out: str | None = None, nproc: int | None = None, steps: int = 6) -> None:
    cuda = torch.cuda.is_available()
    nproc = nproc or (torch.cuda.device_count() if cuda else min(4, os.cpu_count() or 1))
    plans = {1: PLANS_1, 2: PLANS_2}.get(nproc, PLANS_4)
    shape = GPU_SHAPE if cuda else dict(SHAPE)
    rep = Report("fidelity", out)
    spec = calibrate() if cuda else cpu_spec(nproc)
    model_s = [modeled(spec, pins, nproc, shape) for pins in tqdm(plans, desc="pricing")]
    runs = measure(plans, nproc, shape, steps)
    measured = [r["step_s"] for r in runs]
    rho = spearman(model_s, measured)
    where = (f"{nproc} x {torch.cuda.get_device_name()}" if cuda
             else f"{nproc} ranks (one thread each)")
    rates = ("" if cuda else ", rates scaled to a rank's share")
    rep.add(f"{MODEL}, fp32 AdamW, {where}, global batch {shape['global_batch']} x "
            f"{shape['seq']}; hardware spec: calibrate{rates} "
            f"({spec.fp32_flops / 1e9:.1f} GFLOP/s fp32, {spec.hbm_bandwidth / 1e9:.1f} GB/s, "
            f"{spec.op_latency * 1e6:.1f} us per op (+{spec.checkpoint_op_overhead * 1e6:.0f}"
            f" / +{spec.selective_op_overhead * 1e6:.0f} us replayed under full / selective "
            f"recompute), all-reduce "
            f"{spec.intra_node_bandwidth / 1e9:.2f} GB/s + {spec.intra_node_latency * 1e6:.0f}"
            f" us, overlap {spec.comm_overlap:g}, ZeRO-3 unit at {spec.zero_efficiency:.2f}"
            f" of the ring model)\n\n" + table(
                ["plan", "modeled s", "measured s", "measured / modeled"],
                [[r["layout"], f"{m:.4f}", f"{r['step_s']:.4f}", f"{r['step_s'] / m:.2f}"]
                 for r, m in zip(runs, model_s)], right=(1, 2, 3)))
    rep.add(f"Spearman rank correlation (modeled vs measured): **{rho:.2f}** over "
            f"{len(plans)} plans.")
    rep.plot("fidelity", lambda ax: (
        ax.scatter(model_s, measured), ax.set_xlabel("modeled step s"),
        ax.set_ylabel("measured step s"), ax.set_title(f"{MODEL}, {where}, "
                                                       f"Spearman {rho:.2f}")))
    if out:
        Path(out, "fidelity.json").write_text(json.dumps(
            dict(spec=dataclasses.asdict(spec), nproc=nproc, shape=shape, runs=runs,
                 modeled_s=model_s, spearman=rho), indent=1))
    rep.save()
