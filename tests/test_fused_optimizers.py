"""LOMO and AdaLomo fused into backward, in one process: the same result as a plain step
after backward with the same rule; clipping, accumulation and fp16 loss scaling."""

import pytest
import torch

from collie_compile.errors import CollieError
from collie_compile.kernels.adalomo import adalomo_state, adalomo_update_reference
from collie_compile.kernels.lomo import lomo_update_reference
from collie_compile.models.registry import build_model, load_config
from collie_compile.optim.in_backward import LOMO, AdaLomo, InBackward, LossScaler

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


@pytest.mark.parametrize("opt", ["lomo", "adalomo", "lion", "adamw", "adan"])
def test_fp16_overflow_skips_the_whole_step(opt):
    """fp16 weights; an overflow injected into one gradient on the second step leaves every
    weight and optimizer state bit-identical and halves the scale; the step after it trains
    again."""
    model = _model(torch.float16)
    victim = model.model.layers[0].mlp.down_proj.weight
    inject = {"on": False}

    def overflow(p):  # registered before the optimizer's hook, so it runs first
        if inject["on"]:
            p.grad.fill_(float("inf"))

    victim.register_post_accumulate_grad_hook(overflow)
    scaler = LossScaler(scale=1024.0)
    options = STATEFUL.get(opt, {"lr": LR})
    o = InBackward(model.parameters(), rule=opt, loss_scaler=scaler, stochastic_rounding=True,
                   **options)
    data = _data(3)

    def closure(ids):
        loss = model(input_ids=ids, labels=ids).loss.float()
        (loss * o.loss_scale).backward()
        return loss.item()

    o.step(lambda: closure(data[0]))
    before = [p.detach().clone() for p in model.parameters()]
    states = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
              for n, st in o.engine.state.items()}
    inject["on"] = True
    o.step(lambda: closure(data[1]))
    inject["on"] = False
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)
    for n, st in o.engine.state.items():
        for k, v in st.items():
            assert torch.equal(v, states[n][k]) if torch.is_tensor(v) else v == states[n][k]
    assert all(p.grad is None for p in model.parameters())
    o.step(lambda: closure(data[2]))
    assert any(not torch.equal(a.detach(), b) for a, b in zip(model.parameters(), before))
    assert scaler.scale == 512.0


# -- Lion, AdamW, Adam, Adan inside backward ---------------------------------------------

STATEFUL = {"adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1),
            "adam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1),
            "lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
            "adan": dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-6, weight_decay=0.1)}


def _after_backward(rule, model, clip=None, micro=1, steps=3, stale=False):
    """The rule's own after-backward optimizer: torch's AdamW/Adam, lion-pytorch's Lion,
    the Adan paper's update; backward over the micro-batches, clip, step."""
    from lion_pytorch import Lion

    from collie_compile.optim.optimizers import Adan

    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "lion": Lion,
           "adan": Adan}[rule]
    opt = cls(model.parameters(), **STATEFUL[rule])
    prev = None
    for ids in _data(steps, micro):
        opt.zero_grad(set_to_none=True)
        for chunk in ids.chunk(micro):
            (model(input_ids=chunk, labels=chunk).loss / micro).backward()
        if clip is not None:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            use = prev if stale and prev is not None else norm
            prev = norm
            coef = min(1.0, clip / (use + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _in_backward(rule, model, micro=1, steps=3, **kwargs):
    opt = InBackward(model.parameters(), rule=rule, accumulation_steps=micro,
                     **STATEFUL[rule], **kwargs)
    for ids in _data(steps, micro):
        def closure(ids=ids):
            for chunk in ids.chunk(micro):
                (model(input_ids=chunk, labels=chunk).loss / micro).backward()
            return 0.0
        opt.step(closure)
        assert all(p.grad is None for p in model.parameters())
    return [p.detach().clone() for p in model.parameters()], opt


def _moved_err(ours, ref):
    """||ours - ref|| / ||ref - start||, over all weights."""
    start = [p.detach() for p in _model().parameters()]
    diff = sum(float((a - b).norm()) ** 2 for a, b in zip(ours, ref)) ** 0.5
    moved = sum(float((b - s).norm()) ** 2 for b, s in zip(ref, start)) ** 0.5
    assert moved > 0
    return diff / moved


@pytest.mark.parametrize("rule", list(STATEFUL))
def test_stateful_rule_in_backward_equals_its_optimizer(rule):
    """Three steps, no clipping: bit-identical to torch's AdamW/Adam, lion-pytorch's Lion
    and the Adan update applied after a plain backward."""
    ours, _ = _in_backward(rule, _model())
    assert _moved_err(ours, _after_backward(rule, _model())) == 0.0


@pytest.mark.parametrize("rule", list(STATEFUL))
def test_stateful_rule_with_two_pass_clipping_and_accumulation(rule):
    """Two micro-batches per step and the global norm clipped: within 1e-6 of how far the
    weights moved (the norm is summed in fp64 here, in fp32 by torch's clip)."""
    ours, opt = _in_backward(rule, _model(), micro=2, max_grad_norm=0.05)
    assert opt.engine.last_grad_norm > 0.05  # the clip was active
    ref = _after_backward(rule, _model(), clip=0.05, micro=2)
    assert _moved_err(ours, ref) <= 1e-6
    assert _moved_err(ours, _after_backward(rule, _model(), micro=2)) > 1e-3  # clip mattered


def test_stateful_rule_with_the_stale_norm():
    ours, _ = _in_backward("adamw", _model(), max_grad_norm=0.05, clip_mode="stale")
    ref = _after_backward("adamw", _model(), clip=0.05, stale=True)
    assert _moved_err(ours, ref) <= 1e-6


def test_bf16_weights_keep_an_fp32_master_unless_rounding_stochastically():
    """bf16 AdamW inside backward equals the after-backward AdamW on fp32 masters exactly;
    with stochastic rounding no master is kept."""
    from collie_compile.optim.optimizers import AdamW

    a, b = _model(torch.bfloat16), _model(torch.bfloat16)
    _, opt = _in_backward("adamw", a)
    after = AdamW(b.parameters(), **STATEFUL["adamw"])
    for ids in _data(3):
        after.zero_grad()
        b(input_ids=ids, labels=ids).loss.backward()
        after.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for i, q in enumerate(b.parameters()):  # the engine names parameters by position
        master = opt.engine.state[str(i)]["master"]
        assert master.dtype == torch.float32
        assert torch.equal(master, after.state[q]["master"])
    _, sr = _in_backward("adamw", _model(torch.bfloat16), stochastic_rounding=True)
    assert all("master" not in st for st in sr.engine.state.values())


def test_parallelize_single_process_in_backward_equals_after_backward(tmp_path):
    """Through parallelize on one process: the plan records the choice, and the weights
    and losses equal the same rule stepping after backward."""
    import torch.distributed as dist

    from collie_compile.runtime.parallel_model import parallelize

    def run(inside):
        pm = parallelize(_model(), seq_len=16, global_batch_size=4, optimizer="adan",
                         lr=1e-2, update_in_backward=inside, max_grad_norm=0.5)
        assert pm.plan.update_in_backward == inside and (pm.fused is not None) == inside
        losses = [pm.train_step({"input_ids": ids}) for ids in _data(3, micro=2)]
        return losses, pm.full_state_dict()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        (la, wa), (lb, wb) = run(True), run(False)
    finally:
        dist.destroy_process_group()
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_adalomo_update_reads_nothing_back_to_the_host():
    """On a GPU a host read is a synchronisation: AdaLomo's scalars between its passes
    (mean(r), eta, 1/max(1, RMS U)) stay tensors, so no op reads one back (aten's
    _local_scalar_dense is what .item() and float() run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "host read"
            return func(*args, **(kwargs or {}))

    for shape in ((6, 5), (7,)):
        p, g = torch.randn(shape), torch.randn(shape)
        state = adalomo_state(p)
        with NoHostReads():
            for _ in range(2):
                adalomo_update_reference(p, g, state, lr=1e-2, wd=0.1, grad_scale=2.0)


def test_torch_schedulers_reach_lomo_after_load_state_dict() -> None:
    """LOMO reads its rate from param_groups, also after load_state_dict made new ones:
    at lr 0 backward moves nothing."""
    from collie_compile.optim.in_backward import LOMO

    w = torch.nn.Parameter(torch.ones(4))
    opt = LOMO([w], lr=0.1)
    opt.load_state_dict(opt.state_dict())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    (w * w).sum().backward()
    assert torch.equal(w.detach(), torch.ones(4)) and opt.engine.lr == 0.0
    opt.param_groups[0]["lr"] = 0.5
    (w * w).sum().backward()
    assert torch.allclose(w.detach(), torch.zeros(4))  # 1 - 0.5 * 2
