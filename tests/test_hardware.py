import json
from dataclasses import asdict

import pytest
import torch

from collie_compile.cost.hardware import CATALOG, GPUSpec, catalog_name, get_gpu, local_gpu
from collie_compile.errors import CollieError


def test_catalog_has_required_gpus():
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "rtx3090", "rtx4090", "v100-32gb",
            "l40s"} <= set(CATALOG)
    h100 = get_gpu("H100-80GB")
    assert h100.memory_bytes == 80 * 2**30 and h100.bf16_flops == 989e12


def test_json_spec_round_trip(tmp_path):
    spec = GPUSpec(**{**asdict(CATALOG["a100-80gb"]), "name": "my-gpu", "memory_bytes": 123,
                      "comm_overlap": 0.0, "fused_gqa_dtypes": ("fp32", "bf16")})
    path = tmp_path / "gpu.json"
    path.write_text(spec.to_json())
    assert get_gpu(str(path)) == spec and spec.fused_gqa("fp32")
    # a spec written before the field existed reads as a GPU with flash attention
    old = {k: v for k, v in asdict(spec).items() if k != "fused_gqa_dtypes"}
    path.write_text(json.dumps(old))
    assert get_gpu(str(path)).fused_gqa_dtypes == ("bf16", "fp16")
    # ... and one written before the checkpoint overheads gets them in proportion to its
    # own op latency (a calibrated host is often 5x slower per op than the catalog's)
    old = {k: v for k, v in asdict(spec).items() if not k.endswith("_op_overhead")}
    path.write_text(json.dumps({**old, "op_latency": 30e-6}))
    read = get_gpu(str(path))
    assert (read.checkpoint_op_overhead, read.selective_op_overhead) == pytest.approx(
        (0.7 * 30e-6, 1.6 * 30e-6))
    path.write_text(json.dumps({**asdict(spec), "selective_op_overhead": 0}))
    assert get_gpu(str(path)).selective_op_overhead == 0  # free: allowed


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    (json.dumps({"name": "x"}), "missing keys"),
    (json.dumps({**asdict(CATALOG["l40s"]), "colour": 1}), "unknown keys"),
    (json.dumps({**asdict(CATALOG["l40s"]), "memory_bytes": -5}), "positive number"),
    (json.dumps({**asdict(CATALOG["l40s"]), "comm_overlap": 1.5}), "fraction from 0 to 1"),
    (json.dumps({**asdict(CATALOG["l40s"]), "op_latency": "5us"}), "positive number"),
    (json.dumps({**asdict(CATALOG["l40s"]), "checkpoint_op_overhead": -1e-6}), "0 or more"),
    (json.dumps({**asdict(CATALOG["l40s"]), "matmul_efficiency": 5.0}), "at most 1"),
    (json.dumps({**asdict(CATALOG["l40s"]), "zero_efficiency": 0}), "fraction above 0"),
    (json.dumps({**asdict(CATALOG["l40s"]), "name": 7}), "non-empty string"),
    (json.dumps({**asdict(CATALOG["l40s"]), "fused_gqa_dtypes": ["fp8"]}), "dtypes among"),
])
def test_bad_spec_files(tmp_path, content, match):
    path = tmp_path / "gpu.json"
    path.write_text(content)
    with pytest.raises(CollieError, match=match):
        get_gpu(str(path))


def test_unknown_gpu():
    with pytest.raises(CollieError, match="unknown GPU 'b200'"):
        get_gpu("b200")


@pytest.mark.parametrize("device,memory,entry", [
    ("NVIDIA H100 80GB HBM3", 85_028_896_768, "h100-80gb"),
    ("NVIDIA H200", 150_109_880_320, "h200"),
    ("NVIDIA A100-SXM4-40GB", 42_298_834_944, "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", 85_098_496_000, "a100-80gb"),
    ("NVIDIA GeForce RTX 3090", 25_447_170_048, "rtx3090"),
    ("Tesla V100-SXM2-32GB", 34_089_730_048, "v100-32gb"),
    ("NVIDIA L40S", 47_697_362_944, "l40s"),
    ("NVIDIA B200", 191_000_000_000, None),
])
def test_cuda_device_names_map_to_the_catalog(device, memory, entry):
    """parallelize plans for the GPU it runs on: torch's names for these cards find their
    catalog entries (the A100s by memory)."""
    assert catalog_name(device, memory) == entry


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in")
def test_cpu_runs_are_priced_with_the_cpus_attention_kernels():
    """On a CPU parallelize plans with a100-80gb's figures but the CPU's SDPA, which
    takes grouped-query attention fused in fp32 too (an A100 would expand K/V)."""
    spec = local_gpu()
    assert spec.memory_bytes == CATALOG["a100-80gb"].memory_bytes and spec.fused_gqa("fp32")
    assert not CATALOG["a100-80gb"].fused_gqa("fp32") and CATALOG["a100-80gb"].fused_gqa("bf16")
    assert not CATALOG["v100-32gb"].fused_gqa("fp16")
