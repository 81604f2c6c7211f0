"""Run by tests/test_kernels.py with TRITON_INTERPRET=1 (it must be set before Triton
decorates the kernels): each kernel against its plain-torch reference."""

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"

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
print("interpreted kernels match the references")
