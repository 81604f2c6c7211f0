"""One framework's training run under torchrun (used by ``python -m benchmarks train``).

Every framework trains the same model from the same initial weights on the same batches
(the global batch split over ranks the same way), with AdamW; rank 0 writes tokens/s and
(``--measure time``) or each rank's peak memory (``--measure memory``, a separate
launch): the largest anonymous resident set sampled every 2 ms during the steps, less
that after the framework's imports and before the model existed. Memory launches run
with MALLOC_MMAP_THRESHOLD_=65536, so every tensor of 64 KiB or more is mapped on its own
and returned to the OS when freed; with the heap trimmed before both readings, set-up
garbage (FSDP's or DeepSpeed's full copy before sharding) does not count, and what
counts is what training holds. (That setting slows every framework down, so the time
launches do without it.)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

MODEL, WARMUP = "small-llama", 2
SHAPE = {"seq": 128, "global_batch": 8}  # the CPU default; --seq / --global-batch change it
INTERLEAVED = "collie-dp+ddp"  # both in one launch, stepping in turn
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def rss_mib() -> float:
    """Anonymous resident memory now (heap, not the shared libraries' code pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def trim() -> float:
    """Return freed heap to the OS; the resident set after it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


class PeakSampler:
    """Largest resident set seen by a background thread while running."""

    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def batches(n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (SHAPE["global_batch"], SHAPE["seq"]), generator=g)
            for _ in range(n)]


def model(device: torch.device | str = "cpu") -> torch.nn.Module:
    from collie_compile.models import build_model, load_config

    torch.manual_seed(0)
    return build_model(load_config(MODEL), device="cpu").to(device)


def local_rows(ids: torch.Tensor) -> torch.Tensor:
    from collie_compile.distributed import device

    share = SHAPE["global_batch"] // dist.get_world_size()
    return ids[dist.get_rank() * share:(dist.get_rank() + 1) * share].to(device())


def run_collie(plan: str, data: list[torch.Tensor], pins: dict | None = None
               ) -> tuple[list[float], str]:
    step, layout = collie_step(plan, pins)
    return timed(step, data), layout


def run_interleaved(data: list[torch.Tensor]) -> dict[str, list[float]]:
    """collie-compile's dp-only plan and DDP built side by side in one process per rank,
    stepping in turn (which goes first alternates): machine noise hits both alike, so
    their per-step ratio is steadier than that of separate launches."""
    collie, ddp = collie_step("dp")[0], torch_step("ddp")
    for ids in data[:WARMUP]:
        collie(ids)
        ddp(ids)
    times: dict[str, list[float]] = {"collie-dp": [], "ddp": []}
    for i, ids in enumerate(data[WARMUP:]):
        pair = [("collie-dp", collie), ("ddp", ddp)]
        for name, step in pair if i % 2 else pair[::-1]:
            times[name].append(timed_once(step, ids))
    return times


def collie_step(plan: str, pins: dict | None = None
                ) -> tuple[Callable[[torch.Tensor], None], str]:
    """A training step of collie-compile's ``plan`` ("dp": dp-only, ZeRO-0; or the auto
    plan, or ``pins``), and the layout it runs."""
    from collie_compile.runtime import parallelize

    world, batch = dist.get_world_size(), SHAPE["global_batch"]
    if pins is None:
        pins = dict(dp=world, tp=1, pp=1, zero=0,
                    micro_batch_size=batch // world) if plan == "dp" else {}
    pm = parallelize(model(), seq_len=SHAPE["seq"], global_batch_size=batch, optimizer="adamw",
                     lr=ADAMW["lr"], **pins)
    return (lambda ids: pm.train_step({"input_ids": ids})), pm.chosen.layout_str()


def torch_step(kind: str) -> Callable[[torch.Tensor], None]:
    """A training step of DDP or FSDP2 (``kind``) on the model."""
    from collie_compile.distributed import device

    m = model(device())
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

    return step


def run_torch(kind: str, data: list[torch.Tensor]) -> tuple[list[float], str]:
    return timed(torch_step(kind), data), kind


def run_deepspeed(stage: int, data: list[torch.Tensor]) -> tuple[list[float], str]:
    import deepspeed

    m = model()
    batch = SHAPE["global_batch"]
    config = {"train_batch_size": batch,
              "train_micro_batch_size_per_gpu": batch // dist.get_world_size(),
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


PEAK = {"mib": 0.0, "sample": False}


def timed(step, data: list[torch.Tensor]) -> list[float]:
    """Seconds of each step after the warm-up ones; records the memory peak meanwhile."""
    for ids in data[:WARMUP]:
        step(ids)
    trim()
    with PeakSampler() if PEAK["sample"] else contextlib.nullcontext() as sampler:
        times = [timed_once(step, ids) for ids in data[WARMUP:]]
    PEAK["mib"] = sampler.peak if sampler else 0.0
    return times


def timed_once(step, ids: torch.Tensor) -> float:
    """Seconds of one step, all ranks in (a barrier before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    step(ids)
    sync()
    dist.barrier()
    return time.perf_counter() - t0


def _import_for(framework: str) -> None:
    import collie_compile.models  # noqa: F401  (transformers' model classes)

    if framework.startswith("collie"):
        import collie_compile.runtime  # noqa: F401
    elif framework.startswith("deepspeed"):
        import deepspeed  # noqa: F401
    else:
        import torch.distributed.fsdp  # noqa: F401
        import torch.nn.parallel  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--measure", choices=("time", "memory"), default="time")
    ap.add_argument("--plans", help="JSON list of plan pins: time each (fidelity suite)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=SHAPE["seq"])
    ap.add_argument("--global-batch", type=int, default=SHAPE["global_batch"])
    args = ap.parse_args()
    SHAPE.update(seq=args.seq, global_batch=args.global_batch)
    PEAK["sample"] = args.measure == "memory"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from collie_compile.distributed import ensure_initialized

    ensure_initialized()
    fw = args.framework
    _import_for(fw)
    if args.plans:  # one launch, many collie-compile plans, back to back
        data = batches(args.steps + WARMUP, 8192)
        results = []
        for pins in json.loads(args.plans):
            times, layout = run_collie("pinned", data, pins)
            results.append({"pins": pins, "layout": layout, "step_s": statistics.median(times),
                            "all_s": times})
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()
        return
    base = trim()  # after the imports: what each framework's code takes is not counted
    data = batches(args.steps + WARMUP, 8192)
    if fw == INTERLEAVED:
        times_by = run_interleaved(data)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump({"framework": fw, "step_s": times_by}, f)
        dist.barrier()
        dist.destroy_process_group()
        return
    if fw.startswith("collie"):
        times, layout = run_collie(fw.removeprefix("collie-"), data)
    elif fw.startswith("deepspeed"):
        times, layout = run_deepspeed(int(fw[-1]), data)
    else:
        times, layout = run_torch(fw, data)
    peak = torch.tensor([PEAK["mib"] - base])
    peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"framework": fw, "layout": layout, "step_s": statistics.median(times),
                       "tokens_per_s": SHAPE["global_batch"] * SHAPE["seq"]
                       / statistics.median(times),
                       "peak_mib": [float(p) for p in peaks]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
