"""Time model: roofline compute per node and alpha-beta collectives.

A node takes max(FLOPs / (peak x matmul efficiency), bytes / (HBM bandwidth x memory
efficiency)), and never less than the host's per-op latency (eager dispatch and kernel
launch). A block's time is the sum over its captured ops. Backward costs twice the
forward (gradients for inputs and weights); recomputation adds the forward again (full)
or its non-matmul part (selective), each op at least the host's latency plus what the
checkpoint's bookkeeping adds per op. Collectives use ring algorithms: all-reduce
moves 2(n-1)/n of the bytes per GPU in 2(n-1) latency steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from collie_compile.cost.hardware import GPUSpec
from collie_compile.cost.profile import ModelProfile
from collie_compile.layout import MATMUL_KINDS

if TYPE_CHECKING:
    from collie_compile.capture.annotate import AnnotatedGraph, NodeInfo


def roofline(flops: float, nbytes: float, gpu: GPUSpec, dtype: str) -> float:
    """Seconds for one kernel doing ``flops`` and moving ``nbytes``."""
    return max(flops / (gpu.peak_flops(dtype) * gpu.matmul_efficiency),
               nbytes / (gpu.hbm_bandwidth * gpu.memory_efficiency))


def node_time(ag: AnnotatedGraph, node: NodeInfo, batch: int, seq: int, gpu: GPUSpec,
              dtype: str) -> float:
    """Forward seconds of one annotated node at a concrete batch and sequence length."""
    return roofline(ag.subs(node.flops, batch, seq), ag.subs(node.bytes, batch, seq), gpu, dtype)


@dataclass(frozen=True)
class BlockTime:
    forward: float
    backward: float  # including recomputation

    @property
    def total(self) -> float:
        return self.forward + self.backward


def block_time(p: ModelProfile, gpu: GPUSpec, micro_batch: int, tp: int = 1,
               recompute: str = "none") -> BlockTime:
    """Seconds of one decoder block for one micro-batch on one tensor-parallel rank, op by
    op from the captured block graph (views are free; ops split by tp take 1/tp, a
    mixture of experts' replicated sublayer all). Recomputation repeats the forward
    (full) or its non-matmul ops (selective: saved matmul outputs are replayed, which
    costs their dispatch only), each op with the checkpoint's host overhead on top of its
    latency floor."""
    def scale(n: dict) -> float:  # a mixture of experts' sublayer runs whole on every rank
        return micro_batch / (1 if n.get("replicated") else tp)

    ops = [(n["kind"] in MATMUL_KINDS,
            roofline(n["flops"] * scale(n), n["bytes"] * scale(n), gpu, p.dtype))
           for n in p.block_graph]
    fwd = sum(max(t, gpu.op_latency) for _, t in ops)
    if recompute == "none":
        return BlockTime(fwd, 2 * fwd)
    if recompute == "full":
        host = gpu.op_latency + gpu.checkpoint_op_overhead
        redo = sum(max(t, host) for _, t in ops)
    elif recompute == "selective":
        host = gpu.op_latency + gpu.selective_op_overhead
        redo = sum(host if matmul else max(t, host) for matmul, t in ops)
    else:
        raise ValueError(f"unknown recompute mode {recompute!r}")
    return BlockTime(fwd, 2 * fwd + redo)


def head_time(p: ModelProfile, gpu: GPUSpec, micro_batch: int, tp: int = 1) -> float:
    """Forward + backward seconds of the LM head and loss for one micro-batch."""
    fwd = p.head_flops * micro_batch / tp / (gpu.peak_flops(p.dtype) * gpu.matmul_efficiency)
    return 3 * fwd


def _link(gpu: GPUSpec, intra_node: bool) -> tuple[float, float]:
    if intra_node:
        return gpu.intra_node_bandwidth * gpu.link_efficiency, gpu.intra_node_latency
    return gpu.inter_node_bandwidth * gpu.link_efficiency, gpu.inter_node_latency


def allreduce_time(nbytes: float, n: int, gpu: GPUSpec, intra_node: bool = True) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` GPUs."""
    if n <= 1:
        return 0.0
    bw, lat = _link(gpu, intra_node)
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def allgather_time(nbytes: float, n: int, gpu: GPUSpec, intra_node: bool = True) -> float:
    """Ring all-gather (or reduce-scatter) producing ``nbytes`` in all on each GPU."""
    if n <= 1:
        return 0.0
    bw, lat = _link(gpu, intra_node)
    return (n - 1) / n * nbytes / bw + (n - 1) * lat


def p2p_time(nbytes: float, gpu: GPUSpec, intra_node: bool = True) -> float:
    """One point-to-point send between pipeline stages."""
    bw, lat = _link(gpu, intra_node)
    return nbytes / bw + lat


def alltoall_time(nbytes: float, n: int, gpu: GPUSpec, intra_node: bool = True) -> float:
    """All-to-all of ``nbytes`` per GPU over ``n`` GPUs: each sends all but its own
    1/n, one message to each peer."""
    if n <= 1:
        return 0.0
    bw, lat = _link(gpu, intra_node)
    return (n - 1) / n * nbytes / bw + (n - 1) * lat
