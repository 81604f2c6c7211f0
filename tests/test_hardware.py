import json
from dataclasses import asdict

import pytest

from collie_compile.errors import CollieError
from collie_compile.hardware import CATALOG, GPUSpec, get_gpu


def test_catalog_has_required_gpus():
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "rtx3090", "rtx4090", "v100-32gb",
            "l40s"} <= set(CATALOG)
    h100 = get_gpu("H100-80GB")
    assert h100.memory_bytes == 80 * 2**30 and h100.bf16_flops == 989e12


def test_json_spec_round_trip(tmp_path):
    spec = GPUSpec(**{**asdict(CATALOG["a100-80gb"]), "name": "my-gpu", "memory_bytes": 123,
                      "comm_overlap": 0.0})
    path = tmp_path / "gpu.json"
    path.write_text(spec.to_json())
    assert get_gpu(str(path)) == spec


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    (json.dumps({"name": "x"}), "missing keys"),
    (json.dumps({**asdict(CATALOG["l40s"]), "colour": 1}), "unknown keys"),
    (json.dumps({**asdict(CATALOG["l40s"]), "memory_bytes": -5}), "positive number"),
    (json.dumps({**asdict(CATALOG["l40s"]), "comm_overlap": 1.5}), "fraction from 0 to 1"),
    (json.dumps({**asdict(CATALOG["l40s"]), "op_latency": "5us"}), "positive number"),
    (json.dumps({**asdict(CATALOG["l40s"]), "matmul_efficiency": 5.0}), "at most 1"),
    (json.dumps({**asdict(CATALOG["l40s"]), "zero_efficiency": 0}), "fraction above 0"),
    (json.dumps({**asdict(CATALOG["l40s"]), "name": 7}), "non-empty string"),
])
def test_bad_spec_files(tmp_path, content, match):
    path = tmp_path / "gpu.json"
    path.write_text(content)
    with pytest.raises(CollieError, match=match):
        get_gpu(str(path))


def test_unknown_gpu():
    with pytest.raises(CollieError, match="unknown GPU 'b200'"):
        get_gpu("b200")
