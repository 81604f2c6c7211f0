import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collie_compile.kernels.lion import lion_update, lion_update_reference
from collie_compile.kernels.lomo import lomo_update


def _kernel_checks(interpret: bool) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_checks.py"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_triton_kernels_equal_references_under_interpreter():
    assert "interpreted kernels match the references" in _kernel_checks(interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_equal_references_on_cuda():
    assert "CUDA kernels match the references" in _kernel_checks(interpret=False)


def test_lion_reference_rule():
    p, g, m = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3)
    lion_update_reference(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, wd=0.5)
    # c = 0.1*g: sign(c) = [1, -1, 0]; p = 1*(1-0.05) - 0.1*sign
    torch.testing.assert_close(p, torch.tensor([0.85, 1.05, 0.95]))
    torch.testing.assert_close(m, torch.tensor([0.01, -0.01, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_uses_reference(dtype):
    """Without CUDA (and outside the interpreter) the update runs the reference."""
    p = torch.ones(10, dtype=dtype)
    lomo_update(p, torch.ones(10, dtype=dtype), lr=0.5, grad_scale=2.0)
    torch.testing.assert_close(p, torch.full((10,), 0.75, dtype=dtype))
    m = torch.zeros(10)
    lion_update(p, -torch.ones(10, dtype=dtype), m, lr=0.25)
    torch.testing.assert_close(p, torch.full((10,), 1.0, dtype=dtype))
