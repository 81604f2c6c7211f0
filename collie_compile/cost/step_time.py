"""Modeled time of one training step, as linear terms per pipeline stage.

Per micro-batch a stage spends ``fixed + sum_c n_c * per_block[c]`` seconds (compute of
its blocks under recompute mode c, tensor-parallel all-reduces, embeddings or LM head,
pipeline sends). A step of m micro-batches over p stages takes

    step = P * ((m + p - 1) * T  +  D)  +  U    (1F1B and GPipe; interleaved: (p-1)/v)

with T the slowest stage's compute and ZeRO-3 parameter traffic (the larger of the two
where communication overlaps compute, their sum where it does not: the spec's
``comm_overlap`` interpolates), D the data-parallel gradient sync left exposed after the
last micro-batch's backward, U the optimizer step and P the forward/backward passes per
step: 2 where an update inside backward needs a measuring pass first (two-pass
global-norm clipping), else 1. The planner's ILP minimises exactly
this; :func:`step_time` evaluates it for a concrete split.

Under expert parallelism (ep > 1) each block adds its all-to-alls (rows to the experts and
back, forward and backward, and again where recomputation reruns the forward) to compute,
the busiest rank of an ep group runs ``imbalance`` times the mean rows through its
experts (:data:`EXPERT_IMBALANCE` unless set), and the experts' gradients are summed over
the dp / ep ranks holding the same experts, outside ZeRO.
"""

from __future__ import annotations

from dataclasses import dataclass

from collie_compile.cost.compute import (
    allgather_time,
    allreduce_time,
    alltoall_time,
    block_time,
    head_time,
    p2p_time,
)
from collie_compile.cost.hardware import GPUSpec
from collie_compile.cost.memory import Layout, vocab_shards
from collie_compile.cost.profile import ModelProfile
from collie_compile.layout import EXPERT_IMBALANCE, RECOMPUTE
from collie_compile.optim.specs import OptimizerSpec


@dataclass(frozen=True)
class StageTime:
    """Seconds for one stage, linear in its blocks per recompute mode."""

    fixed: float  # per micro-batch: embeddings / LM head, pipeline sends
    per_block: dict[str, float]  # per micro-batch, per block
    backward_per_block: float  # backward without recomputation: hides the gradient sync
    zero3_fixed: float  # per micro-batch ZeRO traffic (ZeRO-3 gathers, ZeRO-2 reduce-scatters)
    zero3_per_block: float
    sync_fixed: float  # data-parallel gradient sync after the last backward
    sync_per_block: float
    update_fixed: float  # optimizer step
    update_per_block: float
    overlap: float = 1.0  # fraction of communication hidden behind compute (GPUSpec)
    passes: int = 1  # forward/backward passes per step (OptimizerSpec.backward_passes)

    def compute(self, counts: dict[str, int]) -> float:
        return self.fixed + sum(n * self.per_block[c] for c, n in counts.items())

    def zero3(self, counts: dict[str, int]) -> float:
        return self.zero3_fixed + sum(counts.values()) * self.zero3_per_block

    def busy(self, counts: dict[str, int]) -> float:
        """Seconds per micro-batch: compute and ZeRO traffic, overlapped as far as the
        hardware lets them."""
        return self.hide(self.compute(counts), self.zero3(counts))

    def hide(self, compute: float, comm: float) -> float:
        return max(compute, comm) + (1 - self.overlap) * min(compute, comm)

    def exposed_sync(self, counts: dict[str, int]) -> float:
        """Sync time not hidden behind the last micro-batch's backward (counted without
        recomputation: a conservative overlap that depends on the block count only)."""
        n = sum(counts.values())
        hidden = self.overlap * n * self.backward_per_block
        return max(0.0, self.sync_fixed + n * self.sync_per_block - hidden)

    def update(self, counts: dict[str, int]) -> float:
        return self.update_fixed + sum(counts.values()) * self.update_per_block


def bubble_factor(layout: Layout) -> float:
    """Multiplier of the slowest stage's per-micro-batch time in a step."""
    p, m = layout.pp, layout.num_microbatches
    if layout.schedule == "interleaved":
        return m + (p - 1) / layout.virtual_stages
    return m + p - 1


def stage_time(profile: ModelProfile, gpu: GPUSpec, opt: OptimizerSpec, layout: Layout,
               has_embed: bool, has_head: bool, gpus_per_node: int,
               params_per_rank: tuple[float, float], trainable_fraction: float = 1.0,
               imbalance: float = EXPERT_IMBALANCE) -> StageTime:
    """Linear time terms of one stage; ``params_per_rank`` = (fixed, per block), a
    block's routed experts counted whole (their 1/ep share is taken here)."""
    p, b, tp, d, ep = profile, layout.micro_batch_size, layout.tp, layout.dp, layout.ep
    w = p.itemsize
    tp_intra = tp <= gpus_per_node
    dp_intra = tp * d <= gpus_per_node
    pp_intra = tp * d * layout.pp <= gpus_per_node

    # Each row-parallel linear all-reduces its output forward, the column one its input
    # gradient backward: 2 * row_linears all-reduces of [b, s, h] per block per micro-batch.
    act_bytes = b * p.seq_len * p.hidden_size * w
    tp_comm = 2 * p.row_linears_per_block * allreduce_time(act_bytes, tp, gpu, tp_intra)
    blocks = {c: block_time(p, gpu, b, tp, c) for c in RECOMPUTE}
    per_block = {c: blocks[c].total + tp_comm for c in RECOMPUTE}
    experts = p.block_expert_params / ep if ep > 1 else 0.0
    if experts:
        # 2 all-to-alls forward, 2 backward, 2 more where the forward reruns
        moved = alltoall_time(b * p.expert_rows * p.hidden_size * w, ep, gpu,
                              tp * ep <= gpus_per_node)
        share = p.block_expert_flops / max(p.block_flops, 1)
        for c in RECOMPUTE:
            waits = (imbalance - 1) * share * blocks[c].total
            per_block[c] += (4 + 2 * (c != "none")) * moved + waits
        params_per_rank = (params_per_rank[0], params_per_rank[1] - p.block_expert_params)
    backward = blocks["none"].backward
    fixed = 0.0  # the embedding lookup is negligible beside a block
    if has_head:
        fixed += head_time(p, gpu, b, vocab_shards(p, tp))  # whole where tied
    if layout.pp > 1:  # activations forward, their gradients backward
        chunks = layout.virtual_stages if layout.schedule == "interleaved" else 1
        fixed += 2 * chunks * p2p_time(act_bytes / tp, gpu, pp_intra)

    grad_fixed, grad_block = (x * w for x in params_per_rank)
    zero3_fixed = zero3_block = sync_fixed = sync_block = 0.0
    fsdp = 1 / gpu.zero_efficiency  # ZeRO-2/3 traffic goes through FSDP's flat buffers
    # torch.distributed.pipelining reduce-scatters FSDP2's gradients once, after the last
    # micro-batch; without pp FSDP2 does so every micro-batch
    pipelined = layout.pp > 1
    if d > 1 and layout.zero == 3:
        # gather weights forward and backward per micro-batch; reduce-scatter gradients
        per_mb = 2 if pipelined else 3
        zero3_fixed = per_mb * fsdp * allgather_time(grad_fixed, d, gpu, dp_intra)
        zero3_block = per_mb * fsdp * allgather_time(grad_block, d, gpu, dp_intra)
        if pipelined:
            sync_fixed = fsdp * allgather_time(grad_fixed * trainable_fraction, d, gpu,
                                               dp_intra)
            sync_block = fsdp * allgather_time(grad_block * trainable_fraction, d, gpu,
                                               dp_intra)
    elif d > 1 and layout.zero == 2 and layout.num_microbatches > 1 and not pipelined:
        # sharded gradients cannot accumulate locally: reduce-scatter every micro-batch,
        # then all-gather the updated weights once
        zero3_fixed = fsdp * allgather_time(grad_fixed, d, gpu, dp_intra)
        zero3_block = fsdp * allgather_time(grad_block, d, gpu, dp_intra)
        sync_fixed = fsdp * allgather_time(grad_fixed * trainable_fraction, d, gpu, dp_intra)
        sync_block = fsdp * allgather_time(grad_block * trainable_fraction, d, gpu, dp_intra)
    elif d > 1:  # all-reduce (ZeRO 0) or reduce-scatter + all-gather (ZeRO 1/2): same volume
        via = fsdp if layout.zero == 2 else 1.0
        sync_fixed = via * allreduce_time(grad_fixed * trainable_fraction, d, gpu, dp_intra)
        sync_block = via * allreduce_time(grad_block * trainable_fraction, d, gpu, dp_intra)
    shard = d if layout.zero >= 1 else 1
    per_elem = opt.update_bytes / (gpu.hbm_bandwidth * gpu.memory_efficiency)
    update_block = params_per_rank[1] * trainable_fraction * per_elem / shard
    if experts:  # summed over the dp / ep ranks holding the same experts; never sharded
        sync_block += allreduce_time(experts * w * trainable_fraction, d // ep, gpu, dp_intra)
        update_block += experts * trainable_fraction * per_elem
    return StageTime(fixed, per_block, backward, zero3_fixed, zero3_block, sync_fixed,
                     sync_block, params_per_rank[0] * trainable_fraction * per_elem / shard,
                     update_block, gpu.comm_overlap, opt.backward_passes)


def step_time(layout: Layout, stages: list[StageTime], counts: list[dict[str, int]]) -> float:
    """Seconds per step for ``counts[k][c]`` blocks of mode c on stage k."""
    slowest = max(s.busy(n) for s, n in zip(stages, counts))
    exposed = max(s.exposed_sync(n) for s, n in zip(stages, counts))
    update = max(s.update(n) for s, n in zip(stages, counts))
    return stages[0].passes * (bubble_factor(layout) * slowest + exposed) + update


def model_flops_per_step(profile: ModelProfile, global_batch: int) -> float:
    """Training FLOPs (forward + backward, no recomputation) of one step: for MFU."""
    p = profile
    return 3 * global_batch * (p.num_layers * p.block_flops + p.embed_flops + p.head_flops)
