"""Expert parallelism beside ZeRO-3 and plain replication on a small mixture of experts.

A Mixtral-style model (8 experts, 2 a token, 4 layers) on 4 CPU ranks: the experts
replicated on every rank (dp, ZeRO-0), sharded with everything else by ZeRO-3, or split
by expert parallelism (ep = 4, tokens sent to their experts by all-to-all), with and
without ZeRO-3 for the rest. tokens/s from the median step, all layouts stepping in
turn in one launch; per rank, the plan's memory estimate beside the measured peak of live
tensor bytes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .report import Report, launch, table


def main(out: str | None = None, nproc: int = 4, steps: int = 10) -> None:
    rep = Report("moe", out)
    r = launch("moe_worker.py", nproc, ["--steps", str(steps)])
    tokens = r["shape"]["global_batch"] * r["shape"]["seq"]
    median = {k: statistics.median(v) for k, v in r["step_s"].items()}
    rows, errs = [], []
    for name, t in median.items():
        per_rank = r["memory"][name]
        worst = max(per_rank, key=lambda e: abs(e[0] / e[1] - 1))
        errs.append(abs(worst[0] / worst[1] - 1))
        rows.append([name, r["layout"][name], f"{tokens / t:.0f}",
                     f"{t / median['replicate']:.2f}",
                     f"{max(e[1] for e in per_rank) / 2**20:.1f}",
                     f"{max(e[0] for e in per_rank) / 2**20:.1f}",
                     f"{100 * (worst[0] / worst[1] - 1):+.1f}%"])
    rep.add(f"Mixtral-style MoE, {r['params'] / 1e6:.1f}M parameters (8 experts, 2 a "
            f"token, 4 layers, hidden 256), fp32 AdamW, {nproc} ranks, global batch "
            f"{r['shape']['global_batch']} x {r['shape']['seq']}; {steps} rounds of every "
            "layout stepping in turn after 2 warm-up rounds\n\n" + table(
                ["layout", "plan", "tokens/s", "step ÷ replicate's", "peak MiB / rank",
                 "estimate MiB", "estimate vs measured (worst rank)"], rows,
                right=(2, 3, 4, 5, 6)))
    rep.add("Peak: the most bytes of live tensors a rank held during one training step "
            "(LiveBytes: weights, gradients, optimizer states, activations, communication "
            "buffers), beside the plan's estimate for that rank's stage. On 2 cores, 4 "
            "ranks share the cores: the all-to-all and the gathers cost CPU time here "
            "that a GPU's links would take off the compute.")
    rep.plot("moe_throughput", lambda ax: (
        ax.bar(list(median), [tokens / t for t in median.values()]),
        ax.set_ylabel("tokens/s"), ax.set_title(f"small MoE, {nproc} CPU ranks")))
    if out:
        Path(out, "moe.json").write_text(json.dumps(r, indent=1))
    rep.save()
    if max(errs) > 0.05:
        print(f"note: an estimate is off by {100 * max(errs):.1f}% (more than 5%)")
