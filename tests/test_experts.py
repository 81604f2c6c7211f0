"""Mixtures of experts from transformers' own config classes (issue 32, first part): routed
experts captured with static shapes (``models.experts``), priced at their active FLOPs,
trained in one process exactly as the transformers model trains, at two shapes; every
gradient and weight compared. (pp2 and dp2·ZeRO-3: test_conformance.py's MoE cases.)"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture
from collie_compile.models.probe import probe_config
from collie_compile.models.registry import count_params

# phimoe: its router's no_grad region is a higher-order op whose body export puts at the
# top of the graph (outline_blocks moves it into the block)
pytestmark = pytest.mark.slow  # multi-process or minutes: not in `make test-fast`

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe"]
SHAPES = [(4, 16), (2, 32)]  # (global batch, seq)


def moe(model_type: str) -> torch.nn.Module:
    """The family's default config shrunk (4 experts, 2 a token), as transformers builds it."""
    cfg = probe_config(AutoConfig.for_model(model_type), heads=4, kv_heads=2, vocab=96,
                       no_dropout=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def rel_errs(got: dict, want: dict) -> dict[str, float]:
    """‖got - want‖ / ‖want‖ per tensor, against 1e-4 of the largest tensor's norm where a
    tensor is smaller: a k_proj bias's gradient is analytically zero (softmax ignores a
    shift of the keys), so all of it is rounding; an expert no token reached has a
    gradient of exactly zero on both sides."""
    floor = 1e-4 * max(float(t.norm()) for t in want.values())
    return {k: float((got[k] - w).norm()) / max(float(w.norm()), floor)
            for k, w in want.items()}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("batch,seq", SHAPES)
def test_experts_train_as_transformers_trains(group, model_type: str, batch: int,
                                              seq: int) -> None:
    """Two AdamW steps in two micro-batches: losses, every gradient and every weight
    against the transformers model (its own grouped_mm experts) on the same batches."""
    from collie_compile import parallelize

    model = moe(model_type)
    hf = copy.deepcopy(model)
    opts = dict(lr=1e-2, eps=1e-6)
    pm = parallelize(model, gpus=1, seq_len=seq, global_batch_size=batch, optimizer="adamw",
                     lr=opts["lr"], optimizer_kwargs={"eps": opts["eps"]},
                     micro_batch_size=batch // 2)
    opt = torch.optim.AdamW(hf.parameters(), **opts)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 96, (batch, seq), generator=g)
        ours = pm.train_step({"input_ids": ids})
        opt.zero_grad()
        want = hf(input_ids=ids, labels=ids, use_cache=False).loss
        want.backward()
        opt.step()
        assert ours == pytest.approx(float(want), rel=1e-6)
    grads, weights = pm.full_state_dict(grads=True), pm.full_state_dict()
    assert sorted(weights) == sorted(n for n, _ in hf.named_parameters())
    want_g = {n: p.grad for n, p in hf.named_parameters()}
    want_w = {n: p.detach() for n, p in hf.named_parameters()}
    # per tensor, fp32 sums in another order (micro-batches, grouped products)
    for got, want in ((grads, want_g), (weights, want_w)):
        errs = rel_errs(got, want)
        assert max(errs.values()) <= 2e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    assert any(".experts." in n for n in weights)  # the routed experts trained too


def test_experts_are_priced_at_their_active_flops() -> None:
    """Captured on the meta device (where plans are made): each grouped product counts the
    routed (token, expert) pairs, k of E experts a token, not every expert."""
    model = moe("mixtral").to("meta")
    cfg = model.config
    ag = annotate(capture(model), model)
    experts = [n for n in ag.nodes.values() if n.kind == "experts" and n.block == 0]
    assert len(experts) == 2  # the up (gate|up) and down products
    h, inter, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    tokens = 3 * 64
    active = 2 * tokens * k * (h * 2 * inter + inter * h)
    assert sum(ag.subs(n.flops, 3, 64) for n in experts) == active
    assert cfg.num_local_experts > k  # so pricing every expert would have shown


@pytest.mark.parametrize("model_type", FAMILIES)
def test_estimate_counts_every_expert(tmp_path, model_type: str) -> None:
    """Memory holds every expert: the profile's parameter count is the model's."""
    from collie_compile.cost.estimate import estimate

    model = moe(model_type)
    model.config.save_pretrained(tmp_path)
    assert estimate(str(tmp_path), gpus=1, seq_len=16).num_params == count_params(model)


def test_tp_leaves_the_experts_sublayer_replicated() -> None:
    """Under tp the router, experts and shared experts run whole on every tp rank (ep
    splits experts): annotate marks them replicated, so the tp layout and the cost model
    leave them out; attention still splits. (tp2 and tp2·ep2 against one process:
    test_conformance.py.)"""
    from collie_compile.cost.profile import profile_model
    from collie_compile.runtime.program import tp_layout
    from collie_compile.runtime.refusals import tp_refusal

    model = moe("qwen2_moe")  # a shared expert with its own gate beside the routed ones
    ag = annotate(capture(model, max_seq=16), model)
    moe_nodes = [i for i in ag.nodes.values() if ".mlp." in i.module and i.block == 0]
    assert moe_nodes and all(i.replicated and not i.sharded for i in moe_nodes)
    layout = tp_layout(ag, model.config, 2, False)
    assert layout and not any(".mlp." in ag.nodes[n].module for n in layout)
    assert any(".self_attn." in ag.nodes[n].module for n in layout)
    assert tp_refusal(model.config) is None
    prof = profile_model(model.config, seq_len=16, dtype="fp32")
    assert prof.row_linears_per_block == 1  # o_proj; no MoE linear all-reduces



@pytest.mark.parametrize("preset,total,layers,experts,k,bank", [
    # published configs; totals counted from the transformers model on meta
    ("mixtral-8x7b", 46_702_792_704, 32, 8, 2, 3 * 4096 * 14336),
    ("qwen3-30b-a3b", 30_532_122_624, 48, 128, 8, 3 * 2048 * 768)])
def test_moe_presets_count_every_and_active_parameters(capsys, preset: str, total: int,
                                                       layers: int, experts: int, k: int,
                                                       bank: int) -> None:
    """The estimate holds every expert in memory (the exact published count) and says how
    many parameters a token uses: k of E experts in each layer's bank."""
    import json

    from collie_compile.cli import main

    assert main(["estimate", preset, "--gpus", "8", "--gpu", "h100-80gb", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_params"] == total
    assert doc["active_params"] == total - layers * (experts - k) * bank
    assert main(["estimate", preset, "--gpus", "8", "--gpu", "h100-80gb"]) == 0
    assert "active a token: routed experts, k of E" in capsys.readouterr().out


def test_leading_dense_layers_do_not_hide_the_experts(tmp_path) -> None:
    """DeepSeek-V3's default config (transformers' own): 3 dense layers come first, and a
    2-block probe of it used to hold no experts, pricing every block as a dense one (a
    twentieth of its weights) and every parameter as active."""
    from transformers import DeepseekV3Config

    from collie_compile.cost.profile import profile_model

    DeepseekV3Config().save_pretrained(tmp_path)
    prof = profile_model(str(tmp_path), seq_len=256, dtype="bf16")
    assert prof.block_params > 10e9  # an MoE layer's 256 experts, not a dense MLP
    assert 37e9 < prof.active_params < 38e9 < 671e9 < prof.num_params  # 37B of 671B
