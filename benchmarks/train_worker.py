"""Training runs under torchrun (used by ``python -m benchmarks train`` and ``fidelity``).

Every framework trains the same model from the same initial weights on the same batches
(the global batch split over ranks the same way), with AdamW. ``--measure time`` builds
each framework named (or each of ``--plans``) side by side in every rank and steps them
in turn; rank 0 writes every step's seconds. ``--measure memory`` runs one framework in
its own launch and writes each rank's peak: the largest anonymous resident set sampled
every 2 ms during the steps, less that after the framework's imports and before the
model existed. Memory launches run with MALLOC_MMAP_THRESHOLD_=65536, so every tensor of
64 KiB or more is mapped on its own and returned to the OS when freed; with the heap
trimmed before both readings, set-up garbage (FSDP's or DeepSpeed's full copy before
sharding) does not count, and what counts is what training holds. (That setting slows
every framework down, so the time launches do without it.)
"""

from __future__ import annotations

import argparse
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
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
Step = Callable[[torch.Tensor], None]


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
    from collie_compile.models.registry import build_model, load_config

    torch.manual_seed(0)
    return build_model(load_config(MODEL), device="cpu").to(device)


def local_rows(ids: torch.Tensor) -> torch.Tensor:
    from collie_compile.runtime.distributed import device

    share = SHAPE["global_batch"] // dist.get_world_size()
    return ids[dist.get_rank() * share:(dist.get_rank() + 1) * share].to(device())


def build(framework: str) -> tuple[Step, str]:
    """A training step of ``framework`` on the model, and the layout it runs."""
    if framework.startswith("collie"):
        return collie_step(framework.removeprefix("collie-"))
    if framework.startswith("deepspeed"):
        return deepspeed_step(int(framework[-1])), f"deepspeed zero-{framework[-1]}"
    return torch_step(framework), framework


def collie_step(plan: str, pins: dict | None = None) -> tuple[Step, str]:
    """A training step of collie-compile's ``plan`` ("dp": dp-only, ZeRO-0; or the auto
    plan, or ``pins``), and the layout it runs."""
    from collie_compile.runtime.parallel_model import parallelize

    world, batch = dist.get_world_size(), SHAPE["global_batch"]
    if pins is None:
        pins = dict(dp=world, tp=1, pp=1, zero=0,
                    micro_batch_size=batch // world) if plan == "dp" else {}
    pm = parallelize(model(), seq_len=SHAPE["seq"], global_batch_size=batch, optimizer="adamw",
                     lr=ADAMW["lr"], **pins)
    return (lambda ids: pm.train_step({"input_ids": ids})), pm.chosen.layout_str()


def torch_step(kind: str) -> Step:
    """A training step of DDP or FSDP2 (``kind``) on the model."""
    from collie_compile.runtime.distributed import device

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


def deepspeed_step(stage: int) -> Step:
    """A training step of a DeepSpeed engine at ZeRO ``stage`` on the model."""
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

    return step


def peak_during(step: Step, data: list[torch.Tensor]) -> float:
    """Largest resident set (MiB) while taking the steps after the warm-up ones."""
    for ids in data[:WARMUP]:
        step(ids)
    trim()
    with PeakSampler() as sampler:
        for ids in data[WARMUP:]:
            step(ids)
    return sampler.peak


def timed_once(step: Step, ids: torch.Tensor) -> float:
    """Seconds of one step, all ranks in (a barrier before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    step(ids)
    sync()
    dist.barrier()
    return time.perf_counter() - t0


def round_robin(steps: dict[str, Step], data: list[torch.Tensor]) -> dict[str, list[float]]:
    """Seconds of each step of each entry, all built in this process and stepping in
    turn, each round starting one entry further on. The machine's speed drifts by tens
    of percent over minutes (a neighbour's load, the clock): entries measured in turn
    meet the same drift, so their ratios hold where back-to-back runs do not."""
    names = list(steps)
    for ids in data[:WARMUP]:
        for name in names:
            steps[name](ids)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, ids in enumerate(data[WARMUP:]):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed_once(steps[name], ids))
    return times


def _import_for(framework: str) -> None:
    import collie_compile.models.registry  # noqa: F401  (transformers' model classes)

    if framework.startswith("collie"):
        import collie_compile.runtime.parallel_model  # noqa: F401
    elif framework.startswith("deepspeed"):
        import deepspeed  # noqa: F401
    else:
        import torch.distributed.fsdp  # noqa: F401
        import torch.nn.parallel  # noqa: F401


def write(path: str, result: object) -> None:
    """Rank 0 writes ``result`` as JSON; then every rank leaves."""
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", required=True,
                    help="one, or several separated by commas: timed in turn (round_robin)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--measure", choices=("time", "memory"), default="time")
    ap.add_argument("--plans", help="JSON list of plan pins: time each (fidelity suite)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=SHAPE["seq"])
    ap.add_argument("--global-batch", type=int, default=SHAPE["global_batch"])
    args = ap.parse_args()
    SHAPE.update(seq=args.seq, global_batch=args.global_batch)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from collie_compile.runtime.distributed import ensure_initialized

    ensure_initialized()
    frameworks = args.framework.split(",")
    for fw in frameworks:
        _import_for(fw)
    base = trim()  # after the imports: what each framework's code takes is not counted
    data = batches(args.steps + WARMUP, 8192)
    if args.plans:  # many collie-compile plans in one launch, in turn
        plans = json.loads(args.plans)
        built = [collie_step("pinned", pins) for pins in plans]
        times = round_robin({str(i): step for i, (step, _) in enumerate(built)}, data)
        return write(args.out, [{"pins": pins, "layout": layout, "all_s": times[str(i)],
                                 "step_s": statistics.median(times[str(i)])}
                                for i, (pins, (_, layout)) in enumerate(zip(plans, built))])
    if args.measure == "time":
        built = {fw: build(fw) for fw in frameworks}
        times = round_robin({fw: step for fw, (step, _) in built.items()}, data)
        return write(args.out, {"layout": {fw: layout for fw, (_, layout) in built.items()},
                                "shape": SHAPE, "step_s": times})
    if len(frameworks) > 1:
        raise SystemExit("--measure memory takes one framework: each peak is its process's")
    step, layout = build(frameworks[0])
    peak = torch.tensor([peak_during(step, data) - base])
    peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    write(args.out, {"framework": frameworks[0], "layout": layout,
                     "peak_mib": [float(p) for p in peaks]})


if __name__ == "__main__":
    main()
