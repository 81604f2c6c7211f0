"""Does the cost model order plans as reality does? Modeled against measured step time.

The hardware spec comes from ``calibrate`` on this machine (matmul rate, copy bandwidth,
a gloo all-reduce's latency and bandwidth). The runs put ``nproc`` ranks (one thread
each; by default one per core, at most 4) on the machine, so a rank gets cores/nproc of
a core: the measured compute and memory rates are scaled by that share before planning. Each plan of
small-llama is then priced by the planner (everything pinned) and run by
``parallelize`` in one torchrun launch; the table gives both times and the Spearman rank
correlation between them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from collie_compile.calibrate import calibrate
from collie_compile.planner import plan

from .report import Report, table
from .train_worker import GLOBAL_BATCH, MODEL, SEQ

ROOT = Path(__file__).resolve().parent.parent
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


def modeled(spec: object, pins: dict, nproc: int) -> float:
    p = plan(MODEL, gpus=nproc, gpu=spec, seq_len=SEQ, global_batch_size=GLOBAL_BATCH,
             optimizer="adamw", dtype="fp32", **pins)
    return p.chosen.step_time_s


def main(out: str | None = None, nproc: int | None = None, steps: int = 6) -> None:
    nproc = nproc or min(4, os.cpu_count() or 1)
    plans = PLANS_2 if nproc == 2 else PLANS_4
    rep = Report("fidelity", out)
    spec = cpu_spec(nproc)
    model_s = [modeled(spec, pins, nproc) for pins in tqdm(plans, desc="pricing")]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "fidelity.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ROOT / "benchmarks" / "train_worker.py"),
               "--framework", "collie-pinned", "--steps", str(steps),
               "--plans", json.dumps(plans), "--out", str(result)]
        print(f"running {len(plans)} plans on {nproc} ranks ...", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        runs = json.loads(result.read_text())
    measured = [r["step_s"] for r in runs]
    rho = spearman(model_s, measured)
    rep.add(f"{MODEL}, fp32 AdamW, {nproc} ranks (one thread each), global batch "
            f"{GLOBAL_BATCH} x {SEQ}; hardware spec: calibrate, rates scaled to a rank's "
            f"share ({spec.fp32_flops / 1e9:.1f} GFLOP/s fp32, "
            f"{spec.hbm_bandwidth / 1e9:.1f} GB/s, all-reduce "
            f"{spec.intra_node_bandwidth / 1e9:.2f} GB/s + {spec.intra_node_latency * 1e6:.0f}"
            " us)\n\n" + table(
                ["plan", "modeled s", "measured s", "measured / modeled"],
                [[r["layout"], f"{m:.3f}", f"{r['step_s']:.3f}", f"{r['step_s'] / m:.2f}"]
                 for r, m in zip(runs, model_s)], right=(1, 2, 3)))
    rep.add(f"Spearman rank correlation (modeled vs measured): **{rho:.2f}** over "
            f"{len(plans)} plans.")
    rep.plot("fidelity", lambda ax: (
        ax.scatter(model_s, measured), ax.set_xlabel("modeled step s"),
        ax.set_ylabel("measured step s"), ax.set_title(f"{MODEL}, {nproc} ranks, "
                                                       f"Spearman {rho:.2f}")))
    rep.save()
