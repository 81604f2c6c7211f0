import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

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



def test_cpu_updates_make_no_whole_parameter_temporaries():
    """On the CPU each rule's reference runs slice by slice (rows at a time for AdaLomo's
    factored moments): its temporaries stay a slice however large the weight, and the
    result is the whole-tensor reference's. Inside backward a whole-parameter temporary
    came on top of the activations (AdamW's sqrt(v) and its quotient: 2 x 12 MiB)."""
    from collie_compile.cost.measure import LiveBytes
    from collie_compile.kernels._launch import REFERENCE_SLICE
    from collie_compile.kernels.adalomo import (
        adalomo_state,
        adalomo_update,
        adalomo_update_reference,
    )
    from collie_compile.kernels.adamw import adamw_update, adamw_update_reference
    from collie_compile.kernels.adan import adan_update, adan_update_reference
    from collie_compile.kernels.lion import lion_update_reference
    from collie_compile.kernels.lomo import lomo_update_reference

    gen = torch.Generator().manual_seed(0)
    shape = (600, 1000)  # 600k elements: about 9 slices
    g, w = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ada = {"lr": 1e-2, "betas": (0.98, 0.92, 0.99), "eps": 1e-8, "wd": 0.1}
    adam = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "wd": 0.1, "step": 2}

    def run(adamw, lion, lomo, adalomo, adan):
        s = {"m": torch.rand(shape, generator=torch.Generator().manual_seed(1)),
             "v": torch.rand(shape, generator=torch.Generator().manual_seed(2)),
             "lion": torch.rand(shape, generator=torch.Generator().manual_seed(3)),
             "ada": adalomo_state(w),
             "adan": {"step": 2, **{k: torch.full(shape, 0.5)
                                    for k in ("m", "v", "n", "prev_grad")}}}
        p = {r: w.clone() for r in ("adamw", "lion", "lomo", "adalomo", "adan")}
        live = LiveBytes()
        live.hold([g, *p.values(), *(t for t in tree_leaves(s) if isinstance(t, torch.Tensor))])
        held = live.peak
        with live:
            adamw(p["adamw"], g, s["m"], s["v"], **adam)
            lion(p["lion"], g, s["lion"], lr=1e-2, wd=0.1)
            lomo(p["lomo"], g, lr=1e-2, wd=0.1, grad_scale=2.0)
            adalomo(p["adalomo"], g, s["ada"], lr=1e-2, wd=0.1)
            adan(p["adan"], g, s["adan"], **ada)
        return p, live.peak - held

    sliced, extra = run(adamw_update, lion_update, lomo_update, adalomo_update, adan_update)
    whole, whole_extra = run(adamw_update_reference, lion_update_reference,
                             lomo_update_reference, adalomo_update_reference,
                             adan_update_reference)
    assert whole_extra >= 2 * g.numel() * 4  # the whole-tensor references: sqrt(v) and more
    assert extra <= 4 * REFERENCE_SLICE * 4 + 4 * shape[1] * 4 < g.numel() * 4
    for r in ("adamw", "lion", "lomo", "adan"):  # elementwise: the same numbers
        torch.testing.assert_close(sliced[r], whole[r], rtol=0, atol=0, msg=r)
    # AdaLomo's row and column sums add up in another order: rounding only
    torch.testing.assert_close(sliced["adalomo"], whole["adalomo"], rtol=1e-5, atol=1e-6)
