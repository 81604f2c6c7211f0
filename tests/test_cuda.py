"""End to end on a CUDA device: skipped without one (CI has none); ``benchmarks/gpu.sh``
runs these where a GPU is present. Kernels compiled for the GPU are checked in
``test_kernels.py``; here the runtime trains on the GPU and must match one CPU process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collie_compile.cost.measure import measure_peak
from collie_compile.cost.memory import Layout, MemoryModel
from collie_compile.cost.profile import profile_model
from collie_compile.optim.specs import get_optimizer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("optimizer,extra", [
    ("adamw", []),
    ("lomo", []),  # the Triton update runs inside backward, on the GPU
    ("adalomo", ["--recompute", "full"]),
])
def test_train_on_the_gpu_matches_one_cpu_process(optimizer: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "collie_compile", "train", "tiny-llama", "--data", str(ROOT / "README.md"),
           "--steps", "8", "--seq-len", "32", "--global-batch", "8", "--lr", "3e-3",
           "--optimizer", optimizer, "--micro-batch-size", "4", "--check", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = [ln for ln in proc.stdout.splitlines() if ln.startswith("one process")][-1]
    # fp32 on both; the GPU's reductions run in another order than the CPU's
    assert float(check.split("parallel run ")[1].split()[0]) < 1e-4, check


@pytest.mark.parametrize("optimizer,recompute", [("adamw", "none"), ("lomo", "full")])
def test_estimate_matches_the_caching_allocator(optimizer: str, recompute: str) -> None:
    measured = measure_peak("small-llama", optimizer, recompute, "fp32", 4, 256,
                            device="cuda").total_bytes
    # fp32 grouped-query attention has no fused CUDA kernel: K/V run expanded
    est = MemoryModel(profile_model("small-llama", seq_len=256, dtype="fp32"),
                      get_optimizer(optimizer), expanded_kv=True).estimate(
        Layout(micro_batch_size=4, seq_len=256, recompute=recompute)).total_bytes
    assert abs(est / measured - 1) < 0.1, (est / 2**20, measured / 2**20)


def test_gqa_in_fp32_runs_expanded_and_equals_the_math_path() -> None:
    """On CUDA, fp32 grouped-query SDPA would take the math path; expanded K/V give the
    same output on a fused kernel, and local_gpu says so for this device."""
    from collie_compile.cost.hardware import local_gpu
    from collie_compile.models.attention import expanded_sdpa, fused_gqa

    dev = torch.device("cuda")
    assert not fused_gqa(dev, torch.float32) and not local_gpu().fused_gqa("fp32")
    q, k, v = (torch.randn(2, h, 128, 64, device=dev) for h in (8, 2, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True)
    torch.testing.assert_close(expanded_sdpa(q, k, v, is_causal=True, enable_gqa=True), ref)
