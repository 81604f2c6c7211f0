"""Adan and Sophia against their update rules written out by hand; torch's rules on
masters equal torch's optimizers; 16-bit parameters keep an fp32 master copy; every
optimizer name resolves for parallelize."""

import pytest
import torch

from collie_compile.errors import CollieError
from collie_compile.optim.optimizers import SGD, Adam, AdamW, Adan, SophiaG, optimizer_class
from collie_compile.optim.specs import OPTIMIZERS


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


@pytest.mark.parametrize("ours,theirs,kw", [
    (AdamW, torch.optim.AdamW, dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)),
    (Adam, torch.optim.Adam, dict(lr=0.1, weight_decay=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
    (SGD, torch.optim.SGD, dict(lr=0.1)),
])
def test_torch_rules_on_masters_equal_torch(ours, theirs, kw):
    """On fp32 weights (no master needed) our classes step exactly as torch's."""
    torch.manual_seed(0)
    p0, grads = torch.randn(6), [torch.randn(6) for _ in range(3)]
    mine, _ = _steps(ours, grads, p0, **kw)
    ref, _ = _steps(theirs, grads, p0, foreach=False, **kw)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_16_bit_weights_get_the_master_copy_versions():
    assert optimizer_class("adamw", torch.bfloat16) is AdamW
    assert optimizer_class("sgd", torch.float16) is SGD
    assert optimizer_class("adamw") is torch.optim.AdamW  # fp32: torch's own (foreach)


@pytest.mark.parametrize("cls", [Adan, SophiaG, AdamW, Adam, SGD])
def test_bf16_parameters_keep_an_fp32_master_copy(cls):
    """torch's AdamW on bf16 weights would leave a weight of 1 at 1: its step of ~lr is
    under half of bf16's ulp there (0.0078)."""
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
