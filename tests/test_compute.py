import dataclasses

import pytest
import torch

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture
from collie_compile.cost.compute import (
    allgather_time,
    allreduce_time,
    block_time,
    node_time,
    roofline,
)
from collie_compile.cost.hardware import get_gpu
from collie_compile.cost.profile import profile_model
from collie_compile.cost.step_time import StageTime
from collie_compile.models.registry import build_model, load_config, with_layers

H100 = get_gpu("h100-80gb")


def test_roofline_picks_the_binding_limit():
    eff_flops = H100.bf16_flops * H100.matmul_efficiency
    eff_bw = H100.hbm_bandwidth * H100.memory_efficiency
    assert roofline(1e12, 1e6, H100, "bf16") == pytest.approx(1e12 / eff_flops)
    assert roofline(1e6, 1e9, H100, "bf16") == pytest.approx(1e9 / eff_bw)


def test_matmuls_compute_bound_elementwise_memory_bound():
    model = build_model(with_layers(load_config("llama-2-7b"), 2), dtype=torch.bfloat16)
    ag = annotate(capture(model), model)
    b, s = 4, 2048
    for n in ag.block_nodes(0):
        if n.kind == "linear":
            flops, nbytes = ag.subs(n.flops, b, s), ag.subs(n.bytes, b, s)
            t = node_time(ag, n, b, s, H100, "bf16")
            assert t == pytest.approx(flops / (H100.bf16_flops * H100.matmul_efficiency))
            assert t > nbytes / (H100.hbm_bandwidth * H100.memory_efficiency)
        elif n.op == "aten.silu.default":
            assert node_time(ag, n, b, s, H100, "bf16") == pytest.approx(
                ag.subs(n.bytes, b, s) / (H100.hbm_bandwidth * H100.memory_efficiency))


def test_block_time_scales_and_recompute_costs():
    p = profile_model("llama-2-7b", seq_len=2048, dtype="bf16")
    one, two = block_time(p, H100, 1), block_time(p, H100, 2)
    # linear in the batch, but for the few ops (scalars, norms' reductions) that sit at the
    # per-op latency floor
    assert two.total == pytest.approx(2 * one.total, rel=1e-2)
    assert block_time(p, H100, 1, tp=2).total == pytest.approx(one.total / 2, rel=2e-2)
    full = block_time(p, H100, 1, recompute="full")
    sel = block_time(p, H100, 1, recompute="selective")
    # compute-bound: the checkpoint's host overhead hides behind the ops it wraps (but
    # for the scalar ops at the latency floor: 0.3% here)
    assert one.backward < sel.backward < full.backward == pytest.approx(3 * one.forward,
                                                                        rel=1e-2)
    # a Llama-2-7B block at seq 2048: ~6 * 202M params * 2048 tokens of matmul FLOPs
    assert p.block_matmul_flops == pytest.approx(2 * 202_375_168 * 2048 + 4 * 2048**2 * 4096,
                                                 rel=1e-3)


def test_small_ops_cost_the_per_op_latency():
    """A tiny block is all overhead: one latency per captured op, forward, backward twice."""
    p = profile_model("tiny-llama", seq_len=16, dtype="fp32")
    t = block_time(p, H100, 1)
    assert t.forward == pytest.approx(len(p.block_graph) * H100.op_latency)
    assert t.backward == pytest.approx(2 * t.forward)
    slow_host = dataclasses.replace(H100, op_latency=2 * H100.op_latency)
    assert block_time(p, slow_host, 1).total == pytest.approx(2 * t.total)


def test_recompute_of_small_ops_costs_the_checkpoints_host_overhead():
    """Latency-bound blocks: each replayed op costs the host latency plus what the
    checkpoint's bookkeeping adds (saved-tensor hooks; selective's dispatch mode), which is
    what an H200 at micro-batch 4 x 512 showed and the old price (one latency) missed."""
    p = profile_model("tiny-llama", seq_len=16, dtype="fp32")
    n, lat = len(p.block_graph), H100.op_latency
    slow = dataclasses.replace(H100, checkpoint_op_overhead=3 * lat, selective_op_overhead=5 * lat)
    none = block_time(p, slow, 1)
    full = block_time(p, slow, 1, recompute="full")
    sel = block_time(p, slow, 1, recompute="selective")
    assert full.backward - none.backward == pytest.approx(n * 4 * lat)
    assert sel.backward - none.backward == pytest.approx(n * 6 * lat)
    free = dataclasses.replace(H100, checkpoint_op_overhead=0.0, selective_op_overhead=0.0)
    assert block_time(p, free, 1, recompute="full").backward == pytest.approx(3 * none.forward)


def test_without_overlap_communication_adds_to_compute():
    """comm_overlap 1 (NCCL): ZeRO traffic and the gradient sync hide behind compute;
    0 (gloo on the CPU's own cores): they add to it."""
    st = StageTime(fixed=1.0, per_block={"none": 1.0}, backward_per_block=0.5,
                   zero3_fixed=2.0, zero3_per_block=0.0, sync_fixed=1.0, sync_per_block=0.0,
                   update_fixed=0.0, update_per_block=0.0)
    two = {"none": 2}  # compute 3 s, ZeRO traffic 2 s, sync 1 s behind 1 s of backward
    assert st.busy(two) == 3.0 and st.exposed_sync(two) == 0.0
    cpu = dataclasses.replace(st, overlap=0.0)
    assert cpu.busy(two) == 5.0 and cpu.exposed_sync(two) == 1.0


def test_ring_collectives():
    n, nbytes = 8, 1e9
    bw = H100.intra_node_bandwidth * H100.link_efficiency
    assert allreduce_time(nbytes, n, H100) == pytest.approx(
        2 * 7 / 8 * nbytes / bw + 14 * H100.intra_node_latency)
    assert allgather_time(nbytes, n, H100) == pytest.approx(allreduce_time(nbytes, n, H100) / 2)
    assert allreduce_time(nbytes, 1, H100) == 0
    assert allreduce_time(nbytes, n, H100, intra_node=False) > allreduce_time(nbytes, n, H100)


def test_zero_efficiency_prices_what_goes_through_fsdp():
    """ZeRO-2/3 traffic (FSDP2's gathers and reduce-scatters, with their copies) costs
    1/zero_efficiency times the ring model; ZeRO-0/1's gradient sync (collie-compile's own
    reducer) does not."""
    from collie_compile.cost.memory import Layout
    from collie_compile.cost.step_time import stage_time
    from collie_compile.optim.specs import get_optimizer

    prof = profile_model("tiny-llama", seq_len=64, dtype="fp32")
    slow = dataclasses.replace(H100, zero_efficiency=0.25)

    def terms(spec, **layout):
        lay = Layout(dp=4, seq_len=64, **layout)
        return stage_time(prof, spec, get_optimizer("adamw"), lay, True, True, 8, (1e6, 1e5))

    z3, z3_slow = terms(H100, zero=3), terms(slow, zero=3)
    assert z3.zero3_per_block > 0 and z3_slow.zero3_per_block == pytest.approx(
        4 * z3.zero3_per_block)
    assert z3_slow.zero3_fixed == pytest.approx(4 * z3.zero3_fixed)
    z2, z2_slow = terms(H100, zero=2), terms(slow, zero=2)
    assert z2.sync_per_block > 0
    assert z2_slow.sync_per_block == pytest.approx(4 * z2.sync_per_block)
    for zero in (0, 1):
        assert terms(slow, zero=zero).sync_per_block == terms(H100, zero=zero).sync_per_block


def test_pipelined_zero3_reduce_scatters_once_a_step():
    """Under pp, torch.distributed.pipelining syncs FSDP2 once after the last backward:
    two gathers per micro-batch and one reduce-scatter a step, where without pp every
    micro-batch also reduce-scatters."""
    from collie_compile.cost.memory import Layout
    from collie_compile.cost.step_time import stage_time
    from collie_compile.optim.specs import get_optimizer

    prof = profile_model("tiny-llama", seq_len=64, dtype="fp32")

    def terms(pp):
        lay = Layout(dp=2, pp=pp, zero=3, num_microbatches=4, seq_len=64)
        return stage_time(prof, H100, get_optimizer("adamw"), lay, True, True, 8, (1e6, 1e5))

    flat, piped = terms(1), terms(2)
    gather = allgather_time(1e5 * 4, 2, H100)  # one block's weights, fp32
    assert flat.zero3_per_block == pytest.approx(3 * gather) and flat.sync_per_block == 0
    assert piped.zero3_per_block == pytest.approx(2 * gather)
    assert piped.sync_per_block == pytest.approx(gather)
