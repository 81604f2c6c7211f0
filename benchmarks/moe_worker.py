"""Mixture-of-experts layouts under torchrun (used by ``python -m benchmarks moe``).

One small Mixtral-style model (8 experts, 2 a token) trained by collie-compile under
several layouts built side by side in every rank, stepping in turn (as train_worker's
frameworks do). Then, one layout at a time, each rank's peak of live tensor bytes
during two steps (weights, gradients, states, activations, buffers: LiveBytes) beside
the plan's estimate for its stage.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from train_worker import ADAMW, round_robin  # this script's folder is on sys.path

SHAPE = {"seq": 128, "global_batch": 8}
LAYOUTS = {  # name -> parallelize pins (dp = the world)
    "replicate": dict(tp=1, pp=1, zero=0, ep=1),
    "zero3": dict(tp=1, pp=1, zero=3, ep=1),
    "ep": dict(tp=1, pp=1, zero=0, ep=None),  # ep = the world
    "ep-zero3": dict(tp=1, pp=1, zero=3, ep=None),
}


def moe_model() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=256, intermediate_size=512,
                               num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=4096,
                               max_position_embeddings=512, num_local_experts=8,
                               num_experts_per_tok=2, sliding_window=None,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def build(name: str) -> object:
    from collie_compile.runtime.parallel_model import parallelize

    world = dist.get_world_size()
    pins = {k: (world if v is None else v) for k, v in LAYOUTS[name].items()}
    return parallelize(moe_model(), seq_len=SHAPE["seq"], global_batch_size=SHAPE["global_batch"],
                       optimizer="adamw", lr=ADAMW["lr"], dp=world,
                       micro_batch_size=SHAPE["global_batch"] // world, **pins)


def memory(name: str, data: list[torch.Tensor]) -> tuple[float, float]:
    """(estimate, measured peak) of this rank's bytes over two steps of ``name``."""
    from collie_compile.cost.measure import LiveBytes
    from collie_compile.passes.data_parallel import grad_reducers

    pm = build(name)
    pm.train_step({"input_ids": data[0]})  # states and gradient buffers exist from here on
    live = LiveBytes()
    live.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    live.hold(t for s in pm._inner_optimizer().state.values() for t in s.values()
              if torch.is_tensor(t))
    live.hold(flat for st in pm.stages for r in grad_reducers(st) for flat in r._flat)
    with live:
        pm.train_step({"input_ids": data[1]})
    return float(pm.chosen.memory[pm.stage_ids[0]]["total_bytes"]), float(live.peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from collie_compile.runtime.distributed import ensure_initialized

    ensure_initialized()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 4096, (SHAPE["global_batch"], SHAPE["seq"]), generator=g)
            for _ in range(args.steps + 2)]
    models = {name: build(name) for name in LAYOUTS}
    steps = {name: (lambda ids, pm=pm: pm.train_step({"input_ids": ids}))
             for name, pm in models.items()}
    layouts = {name: pm.chosen.layout_str() for name, pm in models.items()}
    params = sum(p.numel() for p in moe_model().parameters())
    times = round_robin(steps, data)
    del models, steps
    mem = {}
    for name in LAYOUTS:
        est, peak = memory(name, data)
        every = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(every, torch.tensor([est, peak], dtype=torch.float32))
        mem[name] = [[float(x) for x in e] for e in every]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(dict(step_s=times, layout=layouts, memory=mem, shape=SHAPE,
                           params=params), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
