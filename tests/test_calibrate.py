import pytest

from collie_compile.cli import main
from collie_compile.cost.hardware import get_gpu
from collie_compile.planner.search import plan

pytestmark = pytest.mark.slow  # multi-process or minutes: not in `make test-fast`


def test_calibrate_writes_a_spec_the_planner_accepts(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--quick", "--name", "this-cpu", "--out", str(out)]) == 0
    spec = get_gpu(str(out))
    assert spec.name == "this-cpu" and spec.memory_bytes > 1 << 30
    assert spec.fp32_flops > 1e8 and spec.hbm_bandwidth > 1e8
    assert spec.intra_node_bandwidth > 1e6 and 0 < spec.intra_node_latency < 0.1
    # eager overhead per op is microseconds; gloo's collectives take the compute cores
    assert 1e-7 < spec.op_latency < 1e-3 and spec.comm_overlap == 0.0
    # checkpointing is not free on the host: hooks per saved tensor (full), a Python
    # dispatch mode on every op (selective); on a CPU each costs more than a plain op
    # (here 69-177 and 205-259 us against 12-18), which the defaults (0.7x, 1.6x) are not
    assert spec.checkpoint_op_overhead > spec.op_latency
    assert spec.selective_op_overhead > spec.op_latency
    # FSDP2 on gloo: copies into fresh pages and a reduce-scatter run as an all-reduce
    # usually leave a ZeRO-3 unit behind the ring model; on a quiet CI machine it kept up
    # (measured 1.0 there), so only the range is a property: a fraction, never above 1
    assert 0 < spec.zero_efficiency <= 1
    p = plan("tiny-llama", gpus=2, gpu=str(out), seq_len=64, global_batch_size=4)
    assert p.feasible and p.gpu == "this-cpu" and p.chosen.step_time_s > 0
