"""Attention as captured and run: is_causal instead of a mask, grouped K/V kept grouped
where a fused kernel takes them and expanded (same numbers, priced) where none does."""

import copy

import pytest
import torch

import collie_compile.models.attention as attention
from collie_compile.capture.export import capture
from collie_compile.cost.estimate import estimate
from collie_compile.cost.measure import measure_peak
from collie_compile.cost.memory import Layout, MemoryModel
from collie_compile.cost.profile import profile_model
from collie_compile.models.registry import build_model, load_config
from collie_compile.optim.specs import get_optimizer
from collie_compile.passes.expand_kv import expand_grouped_kv

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_nodes(gm):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.target in (SDPA, attention.expanded_sdpa)]


def _loss(gm, ids):
    out = gm(input_ids=ids, labels=ids)
    return out["loss"] if isinstance(out, dict) else out[0]


def test_capture_passes_is_causal_and_groups_and_restores_the_users_choice():
    """transformers would materialise a [b, 1, s, s] mask under export and copy K/V per
    query group; the captured GQA model calls SDPA with is_causal and enable_gqa instead,
    and a user's model set to plain "sdpa" is left as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(load_config("tiny-qwen2"), attn_implementation="sdpa")
    gm = capture(model).module()
    assert model.config._attn_implementation == "sdpa"
    nodes = _sdpa_nodes(gm)
    assert len(nodes) == model.config.num_hidden_layers
    for node in nodes:
        args = dict(zip(["query", "key", "value", "attn_mask", "dropout_p", "is_causal"],
                        node.args))
        args.update(node.kwargs)
        assert args.get("attn_mask") is None and args["is_causal"] is True
        assert args["enable_gqa"] is True
    # no K/V copies: the 5-d expand of transformers' repeat_kv is gone
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.expand.default
                and len(n.args[1]) == 5]


def test_sliding_window_mask_is_kept():
    """A sliding window narrows the causal mask: it stays a mask, and the captured graph
    gives the eager model's loss past the window (which differs from a full causal one)."""
    torch.manual_seed(0)
    cfg = load_config("tiny-mistral")
    cfg.sliding_window = 8
    model = build_model(cfg, device="cpu")
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    gm = capture(model).module()
    torch.testing.assert_close(_loss(gm, ids), model(input_ids=ids, labels=ids).loss)
    full = copy.deepcopy(model)
    full.config.sliding_window = None
    assert not torch.allclose(full(input_ids=ids, labels=ids).loss,
                              model(input_ids=ids, labels=ids).loss)


def test_expand_grouped_kv_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = build_model(load_config("tiny-qwen2"), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    grouped = capture(model).module()
    expanded = expand_grouped_kv(copy.deepcopy(grouped))
    assert all(n.target is attention.expanded_sdpa for n in _sdpa_nodes(expanded))
    assert all(n.target is SDPA for n in _sdpa_nodes(grouped))
    losses, grads = [], []
    for gm in (grouped, expanded):
        loss = _loss(gm, ids)
        loss.backward()
        losses.append(loss)
        grads.append({k: p.grad for k, p in gm.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_expanded_kv_priced_as_measured(monkeypatch):
    """Where no fused kernel takes groups (fp32 or pre-sm80 CUDA; forced here on the CPU),
    K/V run expanded: the estimate follows the measured peak, and the extra it prices is
    the extra measured."""
    args = ("small-llama", "adamw", "none", "fp32", 2, 256)
    prof, opt = profile_model("small-llama", seq_len=256, dtype="fp32"), get_optimizer("adamw")
    fused = measure_peak(*args).total_bytes
    monkeypatch.setattr(attention, "fused_gqa", lambda device, dtype: False)
    expanded = measure_peak(*args).total_bytes
    layout = Layout(micro_batch_size=2, seq_len=256)
    est_fused, est_expanded = (MemoryModel(prof, opt, expanded_kv=x).estimate(layout).total_bytes
                               for x in (False, True))
    assert prof.act_expanded_kv.sharded > 0
    assert est_expanded == pytest.approx(expanded, rel=0.10)
    assert est_expanded - est_fused == pytest.approx(expanded - fused, rel=0.25)


@pytest.mark.slow
def test_gpus_without_fused_gqa_price_expanded_kv():
    """The same layout costs more activations on a V100 (no flash kernel) than on an A100
    for a GQA model, and the same for a model without groups (GPT-2)."""
    kw = dict(gpus=1, dtype="fp16", micro_batch_size=4, seq_len=128)
    v100, a100 = (estimate("tiny-qwen2", gpu=g, **kw).memory for g in ("v100-32gb", "a100-80gb"))
    prof = profile_model("tiny-qwen2", seq_len=128, dtype="fp16")
    extra = 4 * prof.num_layers * prof.act_expanded_kv.sharded
    assert extra > 0 and v100.activations_bytes - a100.activations_bytes == extra
    g_v100, g_a100 = (estimate("tiny-gpt2", gpu=g, **kw).memory for g in ("v100-32gb",
                                                                           "a100-80gb"))
    assert g_v100.activations_bytes == g_a100.activations_bytes
    from collie_compile.planner.search import plan

    notes = {g: plan("tiny-qwen2", gpus=1, gpu=g, dtype="fp16", seq_len=128,
                     global_batch_size=4).notes for g in ("v100-32gb", "a100-80gb")}
    assert any("K/V are expanded" in n for n in notes["v100-32gb"])
    assert not any("K/V are expanded" in n for n in notes["a100-80gb"])
