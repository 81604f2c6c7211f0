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

PRESETS = ("mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3")
# Megatron-Core's published Mixtral-8x7B layout on 64 H100s at seq 4096 (47.3% MFU there)
MEGATRON = dict(tp=1, ep=8, pp=4, virtual_stages=8)


def preset_plans(rep: Report) -> None:
    """The four MoE presets planned for 8 and 64 H100s (seq 4096, AdamW, bf16), and
    Mixtral-8x7B under Megatron's hand layout priced by the same cost model."""
    from collie_compile.cost.profile import profile_model
    from collie_compile.planner.search import plan

    rows = []
    for model in PRESETS:
        prof = profile_model(model, seq_len=4096)
        for gpus in (8, 64, 256) if model == "deepseek-v3" else (8, 64):
            p = plan(model, gpus=gpus, gpu="h100-80gb", seq_len=4096)
            c = p.chosen
            rows.append([model, f"{prof.num_params / 1e9:.2f} B / {prof.active_params / 1e9:.2f} B",
                         gpus, c.layout_str() if p.feasible else "does not fit: "
                         f"{p.shortfall_bytes / 2**30:.1f} GiB over",
                         f"{c.step_time_s:.2f}" if p.feasible else "—",
                         f"{100 * c.mfu:.1f}%" if p.feasible else "—",
                         f"{c.memory_per_gpu_bytes / 2**30:.1f}" if p.feasible else "—"])
    rep.add("Planned on h100-80gb, seq 4096, AdamW, bf16, the default global batch (~2M "
            "tokens), expert imbalance 1.2 (modelled, not measured)\n\n" + table(
                ["model", "parameters / active", "GPUs", "plan", "step s", "MFU",
                 "GiB / GPU"], rows, right=(2, 4, 5, 6)))
    auto = plan("mixtral-8x7b", gpus=64, gpu="h100-80gb", seq_len=4096)
    rows = [["ours (auto)", auto.chosen.layout_str(), f"{auto.chosen.step_time_s:.2f}",
             f"{100 * auto.chosen.mfu:.1f}%"]]
    for zero in (0, 2):  # Megatron shards states over dp with ep (ZeRO-1); we refuse that
        m = plan("mixtral-8x7b", gpus=64, gpu="h100-80gb", seq_len=4096, zero=zero,
                 **MEGATRON)
        rows.append([f"Megatron's TP1 EP8 PP4 VP8, zero={zero}",
                     m.chosen.layout_str() if m.feasible else "does not fit",
                     f"{m.chosen.step_time_s:.2f}" if m.feasible else "—",
                     f"{100 * m.chosen.mfu:.1f}%" if m.feasible else "—"])
    rep.add("Mixtral-8x7B on 64 H100s, seq 4096, global batch 512, priced by our cost model "
            "(Megatron-Core reports 47.3% MFU measured for its layout)\n\n"
            + table(["layout", "plan", "step s", "MFU"], rows, right=(2, 3))
            + "\n\n" + "\n".join(f"- {n}" for n in auto.notes))


def main(out: str | None = None, nproc: int = 4, steps: int = 10) -> None:
    rep = Report("moe", out)
    preset_plans(rep)
    r = launch("moe_worker.py", nproc, ["--steps", str(steps)])
    tokens = r["shape"]["global_batch"] * r["shape"]["seq"]
    median = {k: statistics.median(v) for k, v in r["step_s"].items()}
    rows, errs = [], []
    for name, t in median.items():
        est = max(e[0] for e in r["memory"][name])  # the busiest rank's, as priced
        peaks = [e[1] for e in r["memory"][name]]
        errs.append(abs(est / max(peaks) - 1))
        rows.append([name, r["layout"][name], f"{tokens / t:.0f}",
                     f"{t / median['replicate']:.2f}",
                     f"{min(peaks) / 2**20:.1f}-{max(peaks) / 2**20:.1f}",
                     f"{est / 2**20:.1f}", f"{100 * (est / max(peaks) - 1):+.1f}%"])
    rep.add(f"Mixtral-style MoE, {r['params'] / 1e6:.1f}M parameters (8 experts, 2 a "
            f"token, 4 layers, hidden 256), fp32 AdamW, {nproc} ranks, global batch "
            f"{r['shape']['global_batch']} x {r['shape']['seq']}; {steps} rounds of every "
            "layout stepping in turn after 2 warm-up rounds\n\n" + table(
                ["layout", "plan", "tokens/s", "step ÷ replicate's", "peak MiB, ranks",
                 "estimate MiB", "estimate vs the fullest rank"], rows,
                right=(2, 3, 4, 5, 6)))
    rep.add("Peak: the most bytes of live tensors a rank held during one training step "
            "(LiveBytes: weights, gradients, optimizer states, activations, communication "
            "buffers), lowest and highest rank, beside the plan's estimate, which prices "
            "the busiest rank (under ep: 1.2x the mean rows through its experts). On 2 cores, 4 "
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
