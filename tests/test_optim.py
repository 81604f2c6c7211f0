"""Adan and Sophia against their update rules written out by hand; 16-bit parameters
keep an fp32 master copy; every optimizer name resolves for parallelize."""

import pytest
import torch

from collie_compile.errors import CollieError
from collie_compile.optim import Adan, SophiaG, optimizer_class
from collie_compile.optimizers import OPTIMIZERS


def _steps(opt_cls, grads, p0, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def test_adan_two_steps_by_hand():
    torch.manual_seed(0)
    p0, g1, g2 = torch.randn(5), torch.randn(5), torch.randn(5)
    lr, (b1, b2, b3), eps, wd = 0.1, (0.9, 0.8, 0.7), 1e-8, 0.05
    p, _ = _steps(Adan, [g1, g2], p0, lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd)
    w = p0.clone()
    m, v, n, prev = torch.zeros(5), torch.zeros(5), torch.zeros(5), g1
    for t, g in enumerate([g1, g2], start=1):
        d = g - prev
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d
        n = b3 * n + (1 - b3) * (g + b2 * d) ** 2
        upd = (m / (1 - b1**t) + b2 * v / (1 - b2**t)) / ((n / (1 - b3**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * upd
        prev = g
    torch.testing.assert_close(p, w)


def test_sophia_clips_the_preconditioned_step():
    p0 = torch.zeros(3)
    g = torch.tensor([1e-3, -20.0, 0.0])
    lr, b1, b2, rho = 0.1, 0.5, 0.9, 0.04
    p, opt = _steps(SophiaG, [g], p0, lr=lr, betas=(b1, b2), rho=rho, weight_decay=0.0,
                    bs=10, hessian_interval=1)
    h = (1 - b2) * g**2
    m = (1 - b1) * g
    ratio = (m.abs() / (rho * 10 * h + 1e-15)).clamp(max=1)
    torch.testing.assert_close(p, -lr * m.sign() * ratio)
    assert float(ratio[1]) < 1.0 and float(ratio[0]) == 1.0  # one scaled, one clipped
    # a caller-supplied Hessian estimate replaces the built-in one
    q = torch.nn.Parameter(torch.zeros(3))
    s = SophiaG([q], lr=lr, betas=(b1, b2), rho=rho, weight_decay=0.0, bs=10)
    q.grad = torch.ones(3)
    s.update_hessian()
    q.grad = g.clone()
    s.step()
    torch.testing.assert_close(s.state[q]["hessian"], (1 - b2) * torch.ones(3))


@pytest.mark.parametrize("cls", [Adan, SophiaG])
def test_bf16_parameters_keep_an_fp32_master_copy(cls):
    p0 = torch.ones(4, dtype=torch.bfloat16)
    p, opt = _steps(cls, [torch.full((4,), 0.5, dtype=torch.bfloat16)] * 3, p0, lr=1e-4)
    master = next(iter(opt.state.values()))["master"]
    assert master.dtype == torch.float32
    assert float(master[0]) != 1.0  # updates far below bf16's ulp at 1 are kept
    assert torch.equal(p, master.to(torch.bfloat16))


def test_every_named_optimizer_resolves():
    for name in OPTIMIZERS:
        cls = optimizer_class(name)
        assert (cls is None) == OPTIMIZERS[name].fused_backward
    with pytest.raises(CollieError, match="unknown optimizer 'adafactor'"):
        optimizer_class("adafactor")
