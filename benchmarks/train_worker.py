"""One framework's training run under torchrun (used by ``python -m benchmarks train``).

Every framework trains the same model from the same initial weights on the same batches
(the global batch split over ranks the same way), with AdamW; rank 0 writes tokens/s and
each rank's peak resident memory above its baseline (measured before the model exists).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

MODEL, SEQ, GLOBAL_BATCH, WARMUP = "small-llama", 128, 8, 2
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(n)]


def model() -> torch.nn.Module:
    from collie_compile.models import build_model, load_config

    torch.manual_seed(0)
    return build_model(load_config(MODEL), device="cpu")


def local_rows(ids: torch.Tensor) -> torch.Tensor:
    share = GLOBAL_BATCH // dist.get_world_size()
    return ids[dist.get_rank() * share:(dist.get_rank() + 1) * share]


def run_collie(plan: str, data: list[torch.Tensor]) -> tuple[list[float], str]:
    from collie_compile.runtime import parallelize

    pins = dict(dp=dist.get_world_size(), tp=1, pp=1, zero=0,
                micro_batch_size=GLOBAL_BATCH // dist.get_world_size()) if plan == "dp" else {}
    pm = parallelize(model(), seq_len=SEQ, global_batch_size=GLOBAL_BATCH, optimizer="adamw",
                     lr=ADAMW["lr"], **pins)
    return timed(lambda ids: pm.train_step({"input_ids": ids}), data), pm.chosen.layout_str()


def run_torch(kind: str, data: list[torch.Tensor]) -> tuple[list[float], str]:
    m = model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        m = DistributedDataParallel(m)
    else:  # FSDP2: each decoder block, then the root (ZeRO-3 semantics)
        from torch.distributed.fsdp import fully_shard

        for block in m.model.layers:
            fully_shard(block)
        fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), **ADAMW)

    def step(ids: torch.Tensor) -> None:
        x = local_rows(ids)
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, data), kind


def run_deepspeed(stage: int, data: list[torch.Tensor]) -> tuple[list[float], str]:
    import deepspeed

    m = model()
    config = {"train_batch_size": GLOBAL_BATCH,
              "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(m.parameters(), **ADAMW)
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=config)

    def step(ids: torch.Tensor) -> None:
        x = local_rows(ids)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()

    return timed(step, data), f"deepspeed zero-{stage}"


def timed(step, data: list[torch.Tensor]) -> list[float]:
    times = []
    for i, ids in enumerate(data):
        dist.barrier()
        t0 = time.perf_counter()
        step(ids)
        dist.barrier()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from collie_compile.distributed import ensure_initialized

    ensure_initialized()
    base = rss_mib()
    data = batches(args.steps + WARMUP, 8192)
    fw = args.framework
    if fw.startswith("collie"):
        times, layout = run_collie(fw.removeprefix("collie-"), data)
    elif fw.startswith("deepspeed"):
        times, layout = run_deepspeed(int(fw[-1]), data)
    else:
        times, layout = run_torch(fw, data)
    peak = torch.tensor([rss_mib() - base])
    peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"framework": fw, "layout": layout, "step_s": statistics.median(times),
                       "tokens_per_s": GLOBAL_BATCH * SEQ / statistics.median(times),
                       "peak_mib": [float(p) for p in peaks]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
