"""Run by tests/test_kernels.py: each kernel against its plain-torch reference, compiled
on a CUDA device, or on the CPU with TRITON_INTERPRET=1 (it must be set before Triton
decorates the kernels)."""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
assert INTERPRET or torch.cuda.is_available(), "needs CUDA or TRITON_INTERPRET=1"
torch.set_default_device("cpu" if INTERPRET else "cuda")

from collie_compile.kernels.lion import lion_update_reference, lion_update_triton  # noqa: E402
from collie_compile.kernels.lomo import lomo_update_reference, lomo_update_triton  # noqa: E402

torch.manual_seed(0)
# sizes that are not multiples of the block (128 under the interpreter), and one below it
for n in (1, 77, 128, 1000, 4099):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        p = torch.randn(n).to(dtype)
        g = torch.randn(n).to(dtype)
        m = torch.randn(n)
        m[: n // 3] = 0  # exercise sign(0) = 0 together with g = 0 below
        g[: n // 5] = 0
        p1, m1, p2, m2 = p.clone(), m.clone(), p.clone(), m.clone()
        lion_update_triton(p1, g, m1, lr=1e-2, beta1=0.9, beta2=0.99, wd=0.1)
        lion_update_reference(p2, g, m2, lr=1e-2, beta1=0.9, beta2=0.99, wd=0.1)
        # fp32 math in both; a last-bit difference in fp32 may round 16-bit weights one
        # ulp apart, no more
        tol = dict(rtol=torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p1, p2, **tol)
        assert not torch.equal(p1, p)  # the update happened

        q1, q2 = p.clone(), p.clone()
        lomo_update_triton(q1, g, lr=1e-2, wd=0.1, grad_scale=4.0)
        lomo_update_reference(q2, g, lr=1e-2, wd=0.1, grad_scale=4.0)
        torch.testing.assert_close(q1, q2, **tol)

from collie_compile.kernels.adalomo import (  # noqa: E402
    adalomo_state,
    adalomo_update_reference,
    adalomo_update_triton,
)
from collie_compile.kernels.lomo import lomo_update_reference  # noqa: E402, F811

# AdaLomo: matrices not multiples of the 16 x 32 tile, a loss scale and weight decay; in
# fp32 two steps (β > 0 on the second). 16-bit weights: one step, within one ulp (the
# interpreter casts fp32 to bf16 by truncation where a GPU rounds to nearest; on a GPU the
# kernel's reductions run in another order than torch's).
for shape in ((1, 1), (17, 33), (40, 7), (64, 96)):
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(shape).to(dtype)
        p1, p2 = p.clone(), p.clone()
        s1, s2 = adalomo_state(p), adalomo_state(p)
        for _ in range(2 if dtype == torch.float32 else 1):
            g = torch.randn(shape).to(dtype)
            adalomo_update_triton(p1, g, s1, lr=1e-2, wd=0.1, grad_scale=8.0)
            adalomo_update_reference(p2, g, s2, lr=1e-2, wd=0.1, grad_scale=8.0)
        torch.testing.assert_close(s1["row"], s2["row"], rtol=1e-5, atol=0)
        torch.testing.assert_close(s1["col"], s2["col"], rtol=1e-5, atol=0)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(p1, p2, rtol=max(eps, 1e-5), atol=1e-6)
        assert not torch.equal(p1, p)

# An all-zero gradient (LoRA's A at its first step: B starts at 0): the factored moment's
# r·cᵀ underflowed to 0 in fp32 and the update was 0/0 = NaN; it must leave p alone
# (weight decay aside), and the next real gradient must still move it
for update in (adalomo_update_triton, adalomo_update_reference):
    p = torch.randn(17, 33)
    q, state = p.clone(), adalomo_state(p)
    update(q, torch.zeros_like(p), state, lr=1e-2)
    assert torch.equal(q, p), update.__name__
    update(q, torch.randn_like(p), state, lr=1e-2)
    assert torch.isfinite(q).all() and not torch.equal(q, p), update.__name__

# Stochastic rounding: every result is one of the two neighbours of the fp32 update, and
# on average the update survives even when it is far below half an ulp.
for dtype in (torch.bfloat16, torch.float16):
    n = 4099
    p = torch.full((n,), 1.0, dtype=dtype)
    g = torch.full((n,), 1.0, dtype=dtype)
    exact = 1.0 - 1e-4  # lr·g = 1e-4: nearest rounding keeps 1.0 in both formats
    nearest = p.clone()  # (the reference: the interpreter's cast truncates)
    lomo_update_reference(nearest, g, lr=1e-4)
    assert torch.equal(nearest, p)
    q = p.clone()
    lomo_update_triton(q, g, lr=1e-4, stochastic=True, seed=3)
    below = (torch.tensor(1.0, dtype=dtype).view(torch.int16) - 1).view(dtype)
    assert set(q.float().unique().tolist()) == {1.0, float(below)}  # the two neighbours
    assert abs(q.float().mean() - exact) < 3e-5, float(q.float().mean())
    r = p.clone()
    lomo_update_reference(r, g, lr=1e-4, stochastic=True,
                          generator=torch.Generator(p.device).manual_seed(0))
    assert abs(r.float().mean() - exact) < 3e-5
    m = torch.zeros(n)
    lion_update_triton(p.clone(), g, m, lr=1e-4, stochastic=True, seed=5)
from collie_compile.kernels.adamw import (  # noqa: E402
    adamw_update_reference,
    adamw_update_triton,
)
from collie_compile.kernels.adan import adan_update_reference, adan_update_triton  # noqa: E402

# AdamW/Adam and Adan: three steps (bias corrections move; Adan's first step has no
# gradient difference), a loss scale, weight decay; fp32 states in both; 16-bit weights
# within an ulp (the interpreter truncates where the reference rounds to nearest).
for n in (1, 77, 1000, 4099):
    for dtype in (torch.float32, torch.bfloat16):
        tol = dict(rtol=max(torch.finfo(dtype).eps, 1e-6), atol=1e-6)
        for decoupled in (True, False):
            p = torch.randn(n).to(dtype)
            p1, p2 = p.clone(), p.clone()
            m1, v1, m2, v2 = (torch.zeros(n) for _ in range(4))
            for t in (1, 2, 3):
                g = torch.randn(n).to(dtype)
                args = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1, step=t,
                            decoupled=decoupled, grad_scale=4.0)
                adamw_update_triton(p1, g, m1, v1, **args)
                adamw_update_reference(p2, g, m2, v2, **args)
                torch.testing.assert_close(p1, p2, **tol)
                p2.copy_(p1)  # one step at a time: an ulp apart at 16 bits would compound
            torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-9)
            assert not torch.equal(p1, p)
        p = torch.randn(n).to(dtype)
        p1, p2 = p.clone(), p.clone()
        s1 = {k: torch.zeros(n) for k in ("m", "v", "n", "prev_grad")}
        s2 = {k: t.clone() for k, t in s1.items()}
        for t in (1, 2, 3):
            s1["step"] = s2["step"] = t
            g = torch.randn(n).to(dtype)
            args = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, wd=0.02, grad_scale=2.0)
            adan_update_triton(p1, g, s1, **args)
            adan_update_reference(p2, g, s2, **args)
            torch.testing.assert_close(p1, p2, **tol)
            p2.copy_(p1)
        for k in ("m", "v", "n", "prev_grad"):
            torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-7)
        assert not torch.equal(p1, p)
print(f"{'interpreted' if INTERPRET else 'CUDA'} kernels match the references")
