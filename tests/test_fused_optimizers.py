"""LOMO and AdaLomo fused into backward, in one process: the same result as a plain step
after backward with the same rule; clipping, accumulation and fp16 loss scaling."""

import pytest
import torch

from collie_compile.errors import CollieError
from collie_compile.kernels.adalomo import adalomo_state, adalomo_update_reference
from collie_compile.kernels.lomo import lomo_update_reference
from collie_compile.models.registry import build_model, load_config
from collie_compile.optim.in_backward import LOMO, AdaLomo, LossScaler

LR, WD = 1e-2, 0.1


def test_adalomo_rule_on_a_matrix_and_a_vector():
    torch.manual_seed(0)
    p, g = torch.randn(3, 5), torch.randn(3, 5)
    state = adalomo_state(p)
    expected = p.clone()
    adalomo_update_reference(p, g, state, lr=0.1, wd=0.01)
    # step 1: beta = 0, so r and c are the plain row/column means of g^2
    sq = g**2 + 1e-30
    r, c = sq.mean(1), sq.mean(0)
    u = g / torch.sqrt(torch.outer(r, c) / r.mean())
    u = u / max(1.0, u.pow(2).mean().sqrt().item())
    eta = 0.1 * max(1e-3, expected.pow(2).mean().sqrt().item())
    torch.testing.assert_close(p, expected * (1 - eta * 0.01) - eta * u)
    torch.testing.assert_close(state["row"], r)
    v, gv = torch.randn(4), torch.randn(4)
    sv = adalomo_state(v)
    v0 = v.clone()
    adalomo_update_reference(v, gv, sv, lr=0.1)
    uv = gv / gv.abs()  # full second moment at step 1: U = g / |g|, RMS 1
    torch.testing.assert_close(v, v0 - 0.1 * max(1e-3, v0.pow(2).mean().sqrt().item()) * uv)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(load_config("tiny-llama"), device="cpu", dtype=dtype)


def _data(steps, micro=1):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2 * micro, 16), generator=g) for _ in range(steps)]


def _plain(opt_name, steps=3, clip=None, clip_value=None, stale=False):
    """Backward, then the same rule applied to each gradient (clipped as asked)."""
    model = _model()
    params = list(model.parameters())
    states = {id(p): adalomo_state(p) for p in params}
    prev_norm = None
    for ids in _data(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in params]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        use = prev_norm if stale and prev_norm is not None else norm
        coef = 1.0 if clip is None else min(1.0, clip / (use + 1e-6))
        prev_norm = norm
        with torch.no_grad():
            for p, g in zip(params, grads):
                g = g * coef
                if clip_value is not None:
                    g = g.clamp(-clip_value, clip_value)
                if opt_name == "lomo":
                    lomo_update_reference(p, g, LR, WD)
                else:
                    adalomo_update_reference(p, g, states[id(p)], LR, WD)
                p.grad = None
    return [p.detach().clone() for p in params]


def _fused(opt_name, steps=3, micro=1, **kwargs):
    model = _model()
    cls = LOMO if opt_name == "lomo" else AdaLomo
    opt = cls(model.parameters(), lr=LR, weight_decay=WD, accumulation_steps=micro, **kwargs)
    for ids in _data(steps, micro):
        def closure(ids=ids):
            total = 0.0
            for chunk in ids.chunk(micro):
                loss = model(input_ids=chunk, labels=chunk).loss / micro
                loss.backward()
                total += loss.item()
            return total
        if kwargs:  # clipping: the step runs the closure (once or twice)
            opt.step(closure)
        else:
            closure()  # backward alone updates the weights
            opt.step()
        assert all(p.grad is None for p in model.parameters())
    return [p.detach().clone() for p in model.parameters()], opt


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt", ["lomo", "adalomo"])
def test_fused_in_backward_equals_plain_step(opt):
    fused, _ = _fused(opt)
    _close(fused, _plain(opt))
    start = [p.detach() for p in _model().parameters()]
    assert any(not torch.equal(a, s) for a, s in zip(fused, start))


def test_accumulation_updates_on_the_last_micro_batch_only():
    """Two micro-batches of 2 (loss halved each) equal one batch of 4, so the update must
    wait for the second accumulation."""
    model = _model()
    params = list(model.parameters())
    for ids in _data(2, micro=2):
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in params:
                lomo_update_reference(p, p.grad, LR, WD)
                p.grad = None
    fused, _ = _fused("lomo", steps=2, micro=2)
    for a, b in zip(fused, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["lomo", "adalomo"])
def test_two_pass_global_norm_clipping_equals_clip_then_step(opt):
    fused, o = _fused(opt, max_grad_norm=0.05)
    assert o.engine.last_grad_norm > 0.05  # the clip was active
    _close(fused, _plain(opt, clip=0.05))
    assert any(not torch.allclose(a, b) for a, b in zip(fused, _plain(opt)))


def test_single_pass_clipping_uses_the_previous_norm():
    fused, _ = _fused("lomo", max_grad_norm=0.05, clip_mode="stale")
    _close(fused, _plain("lomo", clip=0.05, stale=True))


def test_clip_by_value():
    fused, _ = _fused("lomo", clip_value=1e-3)
    _close(fused, _plain("lomo", clip_value=1e-3))
    assert any(not torch.allclose(a, b) for a, b in zip(fused, _plain("lomo")))  # it clipped


def test_two_pass_clipping_needs_a_closure():
    model = _model()
    opt = LOMO(model.parameters(), max_grad_norm=1.0)
    with pytest.raises(CollieError, match="step\\(closure\\)"):
        opt.step()


@pytest.mark.parametrize("opt", ["lomo", "adalomo"])
def test_fp16_overflow_skips_the_whole_step(opt):
    """fp16 weights; an overflow injected into one gradient on the second step leaves every
    weight bit-identical and halves the scale; the step after it trains again."""
    model = _model(torch.float16)
    victim = model.model.layers[0].mlp.down_proj.weight
    inject = {"on": False}

    def overflow(p):  # registered before the optimizer's hook, so it runs first
        if inject["on"]:
            p.grad.fill_(float("inf"))

    victim.register_post_accumulate_grad_hook(overflow)
    cls = LOMO if opt == "lomo" else AdaLomo
    scaler = LossScaler(scale=1024.0)
    o = cls(model.parameters(), lr=LR, loss_scaler=scaler, stochastic_rounding=True)
    data = _data(3)

    def closure(ids):
        loss = model(input_ids=ids, labels=ids).loss.float()
        (loss * o.loss_scale).backward()
        return loss.item()

    o.step(lambda: closure(data[0]))
    before = [p.detach().clone() for p in model.parameters()]
    inject["on"] = True
    o.step(lambda: closure(data[1]))
    inject["on"] = False
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)
    assert all(p.grad is None for p in model.parameters())
    o.step(lambda: closure(data[2]))
    assert any(not torch.equal(a.detach(), b) for a, b in zip(model.parameters(), before))
    assert scaler.scale == 512.0
