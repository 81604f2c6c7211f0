import pytest
import torch

from collie_compile.kernels.adalomo import adalomo_state, adalomo_update_reference
from collie_compile.kernels.lomo import lomo_update_reference
from collie_compile.models import build_model, load_config
from collie_compile.optimizers import LOMO, AdaLomo


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


def _train(fused: bool, opt_name: str, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(load_config("tiny-llama"), device="cpu")
    ids = torch.randint(0, 256, (2, 16))
    params = list(model.parameters())
    if fused:
        (LOMO if opt_name == "lomo" else AdaLomo)(params, lr=1e-2, weight_decay=0.1)
    states = {id(p): adalomo_state(p) for p in params}
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        if not fused:  # the same rule as a plain step after backward
            with torch.no_grad():
                for p in params:
                    if opt_name == "lomo":
                        lomo_update_reference(p, p.grad, 1e-2, 0.1)
                    else:
                        adalomo_update_reference(p, p.grad, states[id(p)], 1e-2, 0.1)
                    p.grad = None
        assert all(p.grad is None for p in params)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("opt", ["lomo", "adalomo"])
def test_fused_in_backward_equals_plain_step(opt):
    fused, plain = _train(True, opt), _train(False, opt)
    start = [p.detach() for p in build_model(load_config("tiny-llama"), device="cpu")
             .parameters()]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, s) for a, s in zip(fused, start))
