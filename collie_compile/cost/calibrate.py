"""Measure the local device and write a hardware spec the planner accepts.

Matmul throughput per dtype, memory bandwidth (a large copy), the host's overhead per
operator in an eager training step and what activation checkpointing adds to it,
collective bandwidth/latency over a real process group (gloo on CPU, NCCL on CUDA) of
two local processes, and how far a ZeRO-3 unit (FSDP2) falls behind the ring model
there. On a CPU-only machine it measures the CPU, so
plans can be checked against real runs here. Collectives overlap compute on GPUs (NCCL
has its own engines), not on a CPU (gloo takes the same cores).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collie_compile.cost.compute import allgather_time
from collie_compile.cost.hardware import GPUSpec
from collie_compile.dtypes import DTYPE_NAMES, fused_gqa_dtypes, torch_dtype

UNMEASURED_LINK = (10e-6, 25e9)  # (s, B/s): PCIe 4.0 x16, for a machine with one GPU


def _best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(dtype: torch.dtype, device: torch.device, n_max: int, repeats: int = 3,
                 budget_s: float = 0.25) -> float:
    """FLOP/s of a square matmul, n doubling from 256 to ``n_max`` while one product takes
    under ``budget_s``: a dtype the device multiplies slowly (half precision on most CPUs)
    is measured at a smaller n instead of taking minutes at the largest."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = min(256, n_max)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_time(lambda a=a, b=b: a @ b, repeats, sync)
        if n >= n_max or seconds > budget_s:
            return 2 * n**3 / seconds
        n *= 2


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 3) -> float:
    """Bytes moved per second by a device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), repeats, sync)


def host_overheads(device: torch.device, repeats: int = 5) -> tuple[float, float, float]:
    """Host seconds per operator of an eager training step made of ops too small to take
    any time, and what full and selective recomputation add per forward op beyond
    replaying it: forward and backward of a chain of tiny linears, norms and activations
    (op latency: the step over three times its forward ops, as backward runs about two per
    forward op), then the same chain under each checkpoint mode. The checkpoint's cost per
    call (RNG state, frames) is spread over the chain's 24 ops, about a block's worth."""
    from torch.utils.checkpoint import checkpoint

    from collie_compile.recompute_policy import checkpoint_kwargs

    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                             torch.nn.SiLU())]
    net = torch.nn.Sequential(*layers).to(device)
    x = torch.randn(2, 8, device=device, requires_grad=True)
    steps = 10
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(mode: str) -> float:
        kwargs = checkpoint_kwargs(mode)

        def run() -> None:
            for _ in range(steps):
                y = net(x) if kwargs is None else checkpoint(net, x, **kwargs)
                y.sum().backward()

        return _best_time(run, repeats, sync) / steps

    plain = seconds("none")
    latency = plain / (3 * (len(layers) + 1))  # and the sum
    # each checkpointed op is replayed (one latency, in the cost model) plus bookkeeping
    full, selective = ((seconds(m) - plain) / len(layers) - latency
                       for m in ("full", "selective"))
    return latency, max(full, 0.0), max(selective, 0.0)


ZERO_UNIT = 1024  # the calibrated ZeRO-3 unit: a [1024, 1024] fp32 linear, 4 MiB


def _zero3_overhead(device: torch.device, repeats: int, sync: Callable[[], None]) -> float:
    """Seconds a ZeRO-3 unit (FSDP2 on one linear of ``ZERO_UNIT`` squared weights) adds to
    a forward and backward over the same unsharded linear: its two all-gathers and one
    reduce-scatter, with the copies into and out of FSDP's flat buffers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(ZERO_UNIT, ZERO_UNIT, bias=False)).to(device)
    sharded = torch.nn.Sequential(torch.nn.Linear(ZERO_UNIT, ZERO_UNIT, bias=False)).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard(sharded[0], mesh=mesh)  # an inner unit: gathered again for its backward
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(8, ZERO_UNIT, device=device)

    def step(net: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            dist.barrier()
            net(x).sum().backward()
        return run

    return max(_best_time(step(sharded), repeats, sync) - _best_time(step(plain), repeats,
                                                                        sync), 1e-7)


def _collective_worker(rank: int, world: int, init_file: str, sizes: list[int],
                       repeats: int, out: dict) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    times = []
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4), device=device)
        times.append(_best_time(lambda x=x: dist.all_reduce(x), repeats, sync))
    zero3 = _zero3_overhead(device, repeats, sync)
    if rank == 0:
        out["times"], out["zero3"] = times, zero3
    dist.destroy_process_group()


def collective_costs(sizes: list[int], repeats: int = 3) -> tuple[float, float, float]:
    """(latency s, bandwidth B/s) of a 2-rank ring all-reduce, and the seconds a ZeRO-3
    unit of ``ZERO_UNIT`` squared fp32 weights adds to a step (:func:`_zero3_overhead`).

    With n = 2 a ring all-reduce sends 2(n-1)/n = 1x the bytes in 2(n-1) = 2 steps: the
    smallest size gives the latency, the line to the largest the bandwidth (two anchors;
    a least-squares line lets one noisy large transfer move the latency tenfold)."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_collective_worker, args=(2, os.path.join(tmp, "init"), sizes, repeats, out),
                 nprocs=2, join=True)
        times, zero3 = list(out["times"]), float(out["zero3"])
    bandwidth = (sizes[-1] - sizes[0]) / max(times[-1] - times[0], 1e-9)
    latency = max((times[0] - sizes[0] / bandwidth) / 2, 1e-7)
    return latency, bandwidth, zero3


def calibrate(name: str | None = None, quick: bool = False) -> GPUSpec:
    """Measure this machine's first accelerator (or its CPU) into a :class:`GPUSpec`."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n = 512 if quick else (8192 if cuda else 2048)
    flops = {name: matmul_flops(torch_dtype(name), device, n) for name in DTYPE_NAMES}
    bw = copy_bandwidth(device, (8 << 20) if quick else (1 << 30 if cuda else 256 << 20))
    sizes = [1 << 12, 1 << 16, 1 << 20] if quick else [1 << 12, 1 << 16, 1 << 20, 1 << 24]
    zero3 = None
    if cuda and torch.cuda.device_count() < 2:
        # one GPU: no link to measure; its plans (dp = tp = pp = 1) never use one
        latency, link_bw = UNMEASURED_LINK
    else:
        latency, link_bw, zero3 = collective_costs(sizes)
    op_latency, checkpoint_overhead, selective_overhead = host_overheads(device)
    if cuda:
        memory = torch.cuda.get_device_properties(0).total_memory
        label = torch.cuda.get_device_name(0).lower().replace(" ", "-")
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        label = f"cpu-{socket.gethostname()}"
    # Measured rates are achieved rates: efficiency factors of 1.
    spec = GPUSpec(name=name or label, memory_bytes=int(memory), bf16_flops=flops["bf16"],
                   fp16_flops=flops["fp16"], fp32_flops=flops["fp32"], hbm_bandwidth=bw,
                   intra_node_bandwidth=link_bw, intra_node_latency=latency,
                   inter_node_bandwidth=link_bw, inter_node_latency=latency,
                   matmul_efficiency=1.0, memory_efficiency=1.0, link_efficiency=1.0,
                   op_latency=op_latency, checkpoint_op_overhead=checkpoint_overhead,
                   selective_op_overhead=selective_overhead,
                   comm_overlap=1.0 if cuda else 0.0,
                   fused_gqa_dtypes=fused_gqa_dtypes(device))
    if zero3 is None:
        return spec
    ring = 3 * allgather_time(ZERO_UNIT**2 * 4, 2, spec)  # what the ring model says
    return dataclasses.replace(spec, zero_efficiency=min(1.0, ring / zero3))
