"""Expert parallelism in the planner, the cost model and the passes, without processes
(the runs themselves, against one process on every tensor: test_conformance.py's ep
cases and test_runtime.py's checkpoints resumed under another ep)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from collie_compile.capture.export import capture_static
from collie_compile.cli import main
from collie_compile.cost.compute import alltoall_time
from collie_compile.cost.hardware import get_gpu
from collie_compile.cost.memory import Layout, MemoryModel
from collie_compile.cost.profile import profile_model
from collie_compile.cost.step_time import stage_time
from collie_compile.errors import CollieError
from collie_compile.models.probe import probe_config
from collie_compile.optim.specs import get_optimizer
from collie_compile.passes.expert_parallel import DISPATCH, expert_parallel
from collie_compile.planner.result import Plan
from collie_compile.planner.search import plan
from collie_compile.runtime.program import drop_guards

GiB = 2**30


@pytest.mark.parametrize("model, total, active", [
    ("gpt-oss-20b", 20_914_757_184, 4_187_440_704),  # the card's 3.6 B leaves out embeddings
    ("deepseek-v3", 671_026_404_352, 37_552_282_624),  # no multi-token-prediction layer
])
def test_presets_count_what_transformers_builds(model: str, total: int, active: int) -> None:
    p = profile_model(model, seq_len=4096)
    assert (p.num_params, p.active_params) == (total, active)
    assert p.num_experts == {"gpt-oss-20b": 32, "deepseek-v3": 256}[model]


def test_experts_split_by_ep_leave_zero_and_are_priced_once() -> None:
    """Per GPU, ep=8 holds 1/8 of every expert bank (weights, gradients, states), the rest
    as before; ZeRO-3 shards only the rest."""
    prof = profile_model("mixtral-8x7b", seq_len=4096)
    mm = MemoryModel(prof, get_optimizer("adamw"))
    base = Layout(dp=8, pp=8, zero=0, seq_len=4096, num_microbatches=8)
    one, eight = (mm.estimate_stage(replace(base, ep=e), 1) for e in (1, 8))
    experts = 4 * prof.block_expert_params * 7 / 8  # stage 1 holds 4 of 32 layers
    assert one.params_bytes - eight.params_bytes == pytest.approx(experts * 2, rel=1e-9)
    assert one.optimizer_bytes - eight.optimizer_bytes == pytest.approx(experts * 12, rel=1e-9)
    # per block, without pp (which keeps ZeRO-3's gathered weights to the step's end)
    w0, w3 = (mm.stage_terms(replace(base, pp=1, ep=8, zero=z), 0, True, True).weights[1]
              for z in (0, 3))
    dense = prof.block_params - prof.block_expert_params
    assert w0 - w3 == pytest.approx(dense * 2 * 7 / 8, rel=1e-9)


def test_step_time_adds_the_all_to_alls() -> None:
    """With even routing (imbalance 1), each block pays four all-to-alls of its rows
    (six where recomputation reruns the forward), inside a node."""
    prof = profile_model("mixtral-8x7b", seq_len=4096)
    gpu, opt = get_gpu("h100-80gb"), get_optimizer("adamw")
    mm = MemoryModel(prof, opt)
    lay = Layout(dp=8, seq_len=4096, num_microbatches=4)
    params = (mm.end_params_per_rank(1, True, True), mm.block_params_per_rank(1))
    t1, t8 = (stage_time(prof, gpu, opt, replace(lay, ep=e), True, True, 8, params,
                         imbalance=1.0) for e in (1, 8))
    a2a = alltoall_time(prof.expert_rows * prof.hidden_size * 2, 8, gpu, True)
    assert t8.per_block["none"] - t1.per_block["none"] == pytest.approx(4 * a2a)
    assert t8.per_block["full"] - t1.per_block["full"] == pytest.approx(6 * a2a)
    uneven = stage_time(prof, gpu, opt, replace(lay, ep=8), True, True, 8, params)
    assert uneven.per_block["none"] > t8.per_block["none"]  # the default 1.2x rows


def test_planner_searches_ep_and_says_why() -> None:
    pinned = plan("mixtral-8x7b", gpus=64, gpu="h100-80gb", seq_len=4096, ep=8, pp=4)
    assert pinned.feasible and pinned.chosen.ep == 8
    assert "experts: ep=8, pinned" in pinned.notes, pinned.notes
    auto = plan("mixtral-8x7b", gpus=64, gpu="h100-80gb", seq_len=4096)
    assert any(n.startswith("experts:") for n in auto.notes), auto.notes
    again = Plan.from_json(pinned.to_json())
    assert again.chosen.ep == 8 and "--ep 8" in again.replan_command()


@pytest.mark.parametrize("pins, match", [
    (dict(ep=2), "has none; use ep=1"),  # a dense model
    (dict(model="tiny-mixtral", ep=3), "does not divide"),  # 8 experts
    (dict(model="tiny-mixtral", ep=2, zero=1), "hold different experts"),
])
def test_ep_that_cannot_run_is_refused_with_the_rule(pins: dict, match: str) -> None:
    """(An update inside backward with ep is planned: test_runtime runs LOMO and AdaLomo,
    test_conformance AdamW so, against one process.)"""
    model = pins.pop("model", "tiny-llama")
    with pytest.raises(CollieError, match=match):
        plan(model, gpus=6 if pins.get("ep") == 3 else 4, seq_len=16, global_batch_size=24,
             dtype="fp32", **pins)


def test_plan_file_with_ep_not_dividing_dp_is_corrupted() -> None:
    p = plan("tiny-mixtral", gpus=4, seq_len=16, global_batch_size=8, dtype="fp32", ep=2)
    text = p.to_json().replace('"ep": 2', '"ep": 3')
    with pytest.raises(CollieError, match="corrupted.*ep = 3 does not divide dp = 4"):
        Plan.from_json(text)


def test_estimate_cli_takes_ep(capsys: pytest.CaptureFixture) -> None:
    assert main(["estimate", "tiny-mixtral", "--gpus", "4", "--ep", "4", "--zero", "3",
                 "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "ep=4" in out and "active a token" in out


def _mixtral_graph(experts: int = 4) -> torch.fx.GraphModule:
    cfg = probe_config(AutoConfig.for_model("mixtral", num_local_experts=experts), heads=4,
                       kv_heads=2, vocab=96, no_dropout=True)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.zeros(2, 8, dtype=torch.long)
    return drop_guards(capture_static(model, ids).module()), model


def test_pass_refuses_what_it_cannot_split() -> None:
    gm, _ = _mixtral_graph(experts=4)
    assert sum(n.target == DISPATCH for n in gm.graph.nodes) == 2  # a marker per layer
    assert expert_parallel(gm, None, 0, 1) is gm  # ep=1: nothing to do
    with pytest.raises(CollieError, match="has 4 experts, which ep=3 does not divide"):
        expert_parallel(gm, None, 0, 3)


def test_lora_on_expert_banks_follows_peft_and_refuses_what_it_cannot_take() -> None:
    """target_parameters on a bank of experts: the adapter at peft's nested names and
    shapes (the first bank targeted innermost, A [r·E, in], B [out, r·E], the rank from
    rank_pattern), the bank frozen; a targeted parameter no linear or bank reads is
    refused, and so is dropout (peft refuses it on parameters too)."""
    from peft import LoraConfig

    from collie_compile.passes.lora import lora, lora_record

    gm, _ = _mixtral_graph()
    cfg = LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0,
                     target_parameters=["gate_up_proj", "down_proj"],
                     rank_pattern={"gate_up_proj": 4})
    out = lora(gm, cfg)
    params = dict(out.named_parameters())
    bank = "model.layers.0.mlp.experts"
    e, up, hidden = params[f"{bank}.gate_up_proj"].shape
    assert params[f"{bank}.base_layer.lora_A.weight"].shape == (4 * e, hidden)
    assert params[f"{bank}.base_layer.lora_B.weight"].shape == (up, 4 * e)
    assert params[f"{bank}.lora_A.weight"].shape[0] == 2 * e
    assert not params[f"{bank}.gate_up_proj"].requires_grad
    assert lora_record(out)[f"{bank}.base_layer"].weight == f"{bank}.gate_up_proj"
    gm, _ = _mixtral_graph()
    with pytest.raises(CollieError, match="input_layernorm"):
        lora(gm, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0,
                            target_parameters=["input_layernorm.weight"]))
    with pytest.raises(CollieError, match="lora_dropout=0"):
        lora(gm, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1,
                            target_parameters=["gate_up_proj"]))


def test_merged_expert_adapters_match_peft() -> None:
    """save_pretrained(merge=True)'s fold of expert adapters equals peft's merge, for a
    bank stored [experts, out, in] (Mixtral) and one stored [experts, in, out]
    (gpt-oss), with a rank and alpha from peft's patterns."""
    from peft import LoraConfig, get_peft_model

    from collie_compile.passes.lora import Adapter, scaling_of
    from collie_compile.runtime.saving import merged

    for family, transposed in (("mixtral", False), ("gpt_oss", True)):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(probe_config(
            AutoConfig.for_model(family), layers=1, no_dropout=True))
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0,
                         target_parameters=["gate_up_proj", "down_proj"],
                         rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 9})
        model = get_peft_model(base, cfg)
        weights = {}  # by the names full_state_dict gives (peft's, less its wrappers)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p)
            n = n.removeprefix("base_model.model.").replace(".default", "")
            weights[n if ".lora_" in n else n.replace(".base_layer", "")] = p.detach().clone()
        bank = "model.layers.0.mlp.experts"
        experts = weights[f"{bank}.gate_up_proj"].shape[0]
        adapters = {f"{bank}.base_layer": Adapter(f"{bank}.gate_up_proj",
                                                  scaling_of(cfg, f"{bank}.gate_up_proj")[1],
                                                  experts, transposed),
                    bank: Adapter(f"{bank}.down_proj", scaling_of(cfg, f"{bank}.down_proj")[1],
                                  experts, transposed)}
        ours = merged(weights, cfg, set(), adapters)
        want = model.merge_and_unload().state_dict()
        for k in (f"{bank}.gate_up_proj", f"{bank}.down_proj"):
            assert not torch.allclose(want[k], weights[k])  # the fold moved the bank
            torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-5)


def test_tp_prices_the_experts_sublayer_whole_on_every_rank() -> None:
    """tp splits attention only: Mixtral's experts (82% of a block's FLOPs) run whole on
    each tp rank, and the block adds no all-reduce for the router."""
    from collie_compile.cost.compute import block_time

    prof = profile_model("mixtral-8x7b", seq_len=4096)
    gpu = get_gpu("h100-80gb")
    one, two = (block_time(prof, gpu, 1, tp).total for tp in (1, 2))
    assert 0.8 * one < two < one
    assert prof.row_linears_per_block == 1  # o_proj
    # q and o [4096, 4096], k and v [1024, 4096]: the router's weight is not split
    assert prof.block_params_sharded == 2 * 4096 * 4096 + 2 * 1024 * 4096


def _router_loss_mixtral(coef: float) -> tuple[object, object]:
    """A tiny Mixtral with its routers' loss on, and a copy for transformers itself."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=coef)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    hf = MixtralForCausalLM(cfg)
    hf.load_state_dict(model.state_dict())
    return model, hf


@pytest.mark.parametrize("rows, seq", [(4, 16), (2, 24)])
def test_router_loss_equals_transformers_with_padding(group: None, rows: int, seq: int
                                                      ) -> None:
    """One micro-batch: the step's loss is the HF model's (cross-entropy plus
    router_aux_loss_coef times its load-balancing loss over the real tokens only), and
    the routers' weights get the gradient of both (after one SGD step, per tensor)."""
    from collie_compile.runtime.parallel_model import parallelize

    model, hf = _router_loss_mixtral(coef=0.5)
    ids = torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # right padding: out of the cross-entropy and the router loss
    out = hf(input_ids=ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask)
    assert float(out.aux_loss.detach()) > 1  # the router loss counts for something here
    pm = parallelize(model, seq_len=seq, global_batch_size=rows, micro_batch_size=rows,
                     optimizer="sgd", lr=0.1)
    loss = pm.train_step({"input_ids": ids, "attention_mask": mask})
    assert loss == pytest.approx(float(out.loss), abs=1e-5)
    out.loss.backward()
    with torch.no_grad():
        for p in hf.parameters():
            p -= 0.1 * p.grad
    got, want = pm.full_state_dict(), hf.state_dict()
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"):
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 1e-5, (name, float(err))


def test_planner_captures_a_model_with_router_loss() -> None:
    """The planner's capture leaves the router loss out (priced as nothing) and plans."""
    model, _ = _router_loss_mixtral(coef=0.02)
    p = plan(model.config, gpus=2, gpu="h100-80gb", seq_len=64, global_batch_size=8)
    assert p.chosen.dp * p.chosen.tp * p.chosen.pp == 2
    assert model.config.output_router_logits  # the user's config is as it was


def test_grouped_experts_pass_dispatches_to_the_fused_kernel_where_it_can() -> None:
    """The per-expert loop a CPU capture records becomes a call that picks torch's fused
    grouped GEMM on a device that takes it; on the CPU it computes the same as before."""
    from collie_compile.models.experts import grouped_mm
    from collie_compile.passes.grouped_experts import fused_grouped_experts

    gm, _ = _mixtral_graph()
    fallback = torch.ops.transformers.grouped_mm_fallback.default
    loops = sum(n.target is fallback for n in gm.graph.nodes)
    assert loops == 4  # gate_up and down in each of 2 layers
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    before = gm(input_ids=ids)
    out = fused_grouped_experts(gm)
    assert sum(n.target is grouped_mm for n in out.graph.nodes) == loops
    assert not any(n.target is fallback for n in out.graph.nodes)
    torch.testing.assert_close(out(input_ids=ids), before, rtol=0, atol=0)


def test_lora_on_a_linear_whose_forward_is_not_its_output_is_refused() -> None:
    """PhiMoE's router is an nn.Linear returning (logits, weights, choices): peft's model
    fails on it, so LoRA there is refused by name; Mixtral's all-linear is not."""
    from peft import LoraConfig

    from collie_compile.runtime.options import refuse_what_peft_cannot_adapt

    phimoe = AutoModelForCausalLM.from_config(probe_config(
        AutoConfig.for_model("phimoe"), layers=1, no_dropout=True))
    with pytest.raises(CollieError, match=r"model.layers.0.mlp.router \(PhimoeTopKRouter\)"):
        refuse_what_peft_cannot_adapt(phimoe, LoraConfig(target_modules=["router", "q_proj"]))
    refuse_what_peft_cannot_adapt(phimoe, LoraConfig(target_modules=["q_proj"]))
    _, mixtral = _mixtral_graph()
    refuse_what_peft_cannot_adapt(mixtral, LoraConfig(target_modules="all-linear"))
