"""peft methods beyond plain LoRA, without processes: what a config becomes (peft's
defaults filled in, refusals named), merging as peft merges, reading saved adapters.
(The training itself, against peft's own on every tensor under tp, pp and ZeRO-3:
test_conformance.py's dora and ia3 cases.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from collie_compile.errors import CollieError
from collie_compile.models.probe import probe_config
from collie_compile.models.prompts import make_encoder, refuse_prompt_with, saved_prompts
from collie_compile.runtime.options import (
    ADAPTER_PREFIX,
    lora_config,
    read_adapter,
    with_peft_defaults,
)
from collie_compile.runtime.saving import merged, save_kind


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(probe_config(
        AutoConfig.for_model(family), layers=2, no_dropout=True))


def _random_adapters(model: torch.nn.Module) -> None:
    """Move every adapter off its init (B = 0 and IA3 = 1 would merge to the base)."""
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data + 0.3 * torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("family, config", [
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        use_dora=True, use_rslora=True, fan_in_fan_out=True)),
    ("llama", IA3Config(target_modules=["k_proj", "o_proj", "down_proj"],
                        feedforward_modules=["down_proj"])),
    # Conv1D weights [in, out], and output scaling of a bias
    ("gpt2", IA3Config(target_modules=["c_attn", "mlp.c_proj", "c_fc"],
                       feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    # SVD form: B (A·E) · alpha / (r + 1e-5)
    ("llama", AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                            target_modules=["q_proj", "o_proj", "down_proj"])),
])
def test_merge_equals_peft_merge_and_unload(family: str, config: object) -> None:
    base = _model(family)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    conv1d = {n for n, m in base.named_modules() if isinstance(m, Conv1D)}  # [in, out]
    model = get_peft_model(base, config)
    _random_adapters(model)
    adapters = {k.removeprefix(ADAPTER_PREFIX): v
                for k, v in get_peft_model_state_dict(model).items()}
    ours = merged({**weights, **adapters}, config, conv1d)
    want = model.merge_and_unload().state_dict()
    assert set(ours) == set(want)
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, weights[k])
    assert changed >= 4  # the merge moved the adapted weights


def test_peft_defaults_filled_in_as_get_peft_model_fills_them() -> None:
    model = _model("llama")
    ia3 = with_peft_defaults(IA3Config(), model)
    assert ia3.target_modules == {"k_proj", "v_proj", "down_proj"}
    assert ia3.feedforward_modules == {"down_proj"}
    lora = with_peft_defaults(LoraConfig(target_modules="all-linear"), model)
    assert {t.rpartition(".")[2] for t in lora.target_modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    given = LoraConfig(target_modules="all-linear")
    with_peft_defaults(given, model)
    assert given.target_modules == "all-linear"  # the user's config is left as it was


@pytest.mark.parametrize("config, why", [
    (LoraConfig(init_lora_weights="pissa"), "initialise the adapter with peft"),
    (LoraConfig(init_lora_weights="olora"), "--peft-adapter"),
    (IA3Config(init_ia3_weights=False), "random scales"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                         encoder_reparameterization_type="LSTM"), "LSTM encoder"),
])
def test_methods_not_built_exactly_are_refused_with_the_reason(config: object,
                                                               why: str) -> None:
    with pytest.raises(CollieError, match=why):
        lora_config(None, None, None, None, 0.0, peft=config)


def test_adalora_needs_its_schedule_and_cannot_continue_an_allocation() -> None:
    config = AdaLoraConfig(total_step=10, target_modules=["q_proj"])
    config.total_step = None  # peft refuses it on construction; a config changed after
    with pytest.raises(CollieError, match="needs total_step"):
        lora_config(None, None, None, None, 0.0, peft=config)
    config = AdaLoraConfig(total_step=10, target_modules=["q_proj"],
                           rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True]})
    with pytest.raises(CollieError, match="already allocated"):
        lora_config(None, None, None, None, 0.0, peft=config)


def test_adalora_refuses_updates_inside_backward(group) -> None:
    from collie_compile import parallelize

    config = AdaLoraConfig(total_step=4, init_r=2, target_r=1, target_modules=["q_proj"])
    with pytest.raises(CollieError, match="AdaLoRA with lion updating inside backward"):
        parallelize(_model("llama"), gpus=1, seq_len=16, global_batch_size=2, peft=config,
                    optimizer="lion", update_in_backward=True)


def test_adalora_resumes_its_rank_allocation_exactly(group, tmp_path: Path) -> None:
    """The importance averages and the rank pattern go into a training checkpoint: 6
    steps straight equal 3, a checkpoint, a new run from it and 3 more (cuts at steps
    1-3, the final one at 4, reapplied at 5), on every adapter tensor and pattern."""
    import json

    from safetensors.torch import load_file

    from collie_compile import parallelize

    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=6, tinit=0,
                           tfinal=1, target_modules=["q_proj", "v_proj", "down_proj"])
    data = [torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))
            for i in range(6)]

    def run(steps: range, resume: Path | None = None):
        pm = parallelize(_model("llama"), gpus=1, seq_len=16, global_batch_size=4,
                         peft=config, optimizer="adamw", lr=1e-2)
        if resume is not None:
            pm.load_checkpoint(resume)
        return pm, [pm.train_step({"input_ids": data[i]}) for i in steps]

    straight, want = run(range(6))
    straight.save_pretrained(tmp_path / "straight")
    first, got = run(range(3))
    first.save_checkpoint(tmp_path / "ckpt")
    second, more = run(range(3, 6), tmp_path / "ckpt")
    second.save_pretrained(tmp_path / "resumed")
    assert got + more == pytest.approx(want, rel=1e-6)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text())
               for d in ("straight", "resumed")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert sum(map(sum, configs[0]["rank_pattern"].values())) == 2 * 6
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors")
            for d in ("straight", "resumed"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_adapters_given_twice_are_refused() -> None:
    with pytest.raises(CollieError, match="peft and lora_rank"):
        lora_config(None, 8, None, None, 0.0, peft=IA3Config())


def test_saved_adapters_read_back_as_their_method(tmp_path: Path) -> None:
    for name, config in (("ia3", IA3Config()), ("dora", LoraConfig(use_dora=True))):
        model = get_peft_model(_model("llama"), config)
        model.save_pretrained(tmp_path / name)
        got, tensors = read_adapter(tmp_path / name)
        assert type(got) is type(config) and not got.inference_mode
        key = ("model.layers.0.mlp.down_proj.ia3_l" if name == "ia3"
               else "model.layers.0.self_attn.q_proj.lora_magnitude_vector")
        assert key in tensors
    # a method the passes do not build is refused on reading too, not trained as another
    model = get_peft_model(_model("llama"), LoHaConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "loha")
    with pytest.raises(CollieError, match="LOHA is not supported"):
        read_adapter(tmp_path / "loha")


def test_prefix_tuning_refuses_what_it_cannot_do_exactly(group) -> None:
    """A prefix's projection saves its output, not the MLP (it cannot go on); the
    sequence after the virtual positions must fit the model's positions; a cache of
    sliding-window layers is filled another way by peft."""
    from collie_compile import parallelize

    llama = _model("llama")
    config = with_peft_defaults(PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
        encoder_hidden_size=16), llama)
    with pytest.raises(CollieError, match="cannot go on"):
        make_encoder(config, llama, {"prompt_embeddings": torch.zeros(4, 8)})
    most = llama.config.max_position_embeddings
    with pytest.raises(CollieError, match=f"use seq_len <= {most - 4}"):
        parallelize(llama, gpus=1, seq_len=most, global_batch_size=2, peft=PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(CollieError, match="sliding windows"):
        parallelize(_model("gemma2"), gpus=1, seq_len=16, global_batch_size=2,
                    peft=PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_p_tuning_saves_the_prompts_peft_saves() -> None:
    """peft saves P-tuning's encoder output, not the encoder: ours from the same weights
    equals its ``get_prompt_embedding_to_save``; and such an adapter cannot continue."""
    model = _model("llama")
    config = with_peft_defaults(PromptEncoderConfig(task_type="CAUSAL_LM",
                                                    num_virtual_tokens=3), model)
    peft = get_peft_model(model, config)
    _random_adapters(peft)
    weights = {f"prompt_encoder.{k}": v
               for k, v in peft.prompt_encoder["default"].state_dict().items()}
    torch.testing.assert_close(saved_prompts(weights, config),
                               peft.get_prompt_embedding_to_save("default"))
    with pytest.raises(CollieError, match="cannot go on"):
        make_encoder(config, model, {"prompt_embeddings": torch.zeros(3, 64)})


def test_prompt_methods_refuse_what_they_cannot_do_exactly() -> None:
    with pytest.raises(CollieError, match="nothing to merge"):
        save_kind(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), True)
    with pytest.raises(CollieError, match="separate-documents"):
        refuse_prompt_with(None, True)
    with pytest.raises(CollieError, match="load-balancing"):
        refuse_prompt_with(object(), False)


def test_dora_with_dropout_trains_as_peft_on_the_same_masks(group, tmp_path: Path) -> None:
    """DoRA's base part with dropout is W of the dropped-out input, a second product:
    with the same random state before each step (the masks drawn in the same order) the
    adapters equal peft's training; with other states they do not (dropout acts)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from collie_compile import parallelize

    _model("llama").save_pretrained(tmp_path / "base")

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base")

    start = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                              use_dora=True,
                                              target_modules=["q_proj", "o_proj", "down_proj"]))
    _random_adapters(start)
    start.save_pretrained(tmp_path / "start")
    data = [torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))
            for i in range(3)]

    def ours(seed: int) -> dict[str, torch.Tensor]:
        pm = parallelize(base(), gpus=1, seq_len=16, global_batch_size=4, lr=1e-2,
                         lora_adapter=tmp_path / "start", optimizer="adamw")
        for i, b in enumerate(data):
            torch.manual_seed(seed + i)
            pm.train_step({"input_ids": b})
        pm.save_pretrained(tmp_path / f"ours{seed}")
        return load_file(tmp_path / f"ours{seed}" / "adapter_model.safetensors")

    ref = PeftModel.from_pretrained(base(), tmp_path / "start", is_trainable=True)
    ref.train()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    for i, b in enumerate(data):
        torch.manual_seed(100 + i)
        opt.zero_grad()
        ref(input_ids=b, labels=b).loss.backward()
        opt.step()
    ref.save_pretrained(tmp_path / "ref")
    want = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    same, other = ours(100), ours(200)
    assert set(same) == set(want) and any("magnitude" in k for k in want)
    for k, v in want.items():
        torch.testing.assert_close(same[k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert max(float((other[k] - v).norm() / v.norm()) for k, v in want.items()) > 1e-3
