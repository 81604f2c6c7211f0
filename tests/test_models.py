import json

import pytest

from collie_compile.errors import CollieError
from collie_compile.models.registry import PRESETS, build_model, count_params, load_config

# Published parameter counts of the Hugging Face models (DESIGN.md; the LLaMA-1 ones are
# the same formula the HF checkpoints give).
PUBLISHED = {
    "gpt2": 124_439_808,
    "llama-7b": 6_738_415_616,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "qwen2-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_counts_match_published(name):
    model = build_model(load_config(name))
    assert next(model.parameters()).device.type == "meta"
    assert count_params(model) == PUBLISHED[name]


def test_required_presets_present():
    required = {"gpt2", "llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-7b",
                "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-405b",
                "mistral-7b", "qwen2-7b"}
    assert required <= set(PRESETS)


def test_local_config_dir_and_file(tmp_path):
    cfg = load_config("tiny-qwen2")
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        loaded = load_config(spec)
        assert loaded.model_type == "qwen2"
        assert count_params(build_model(loaded)) == count_params(build_model(cfg))


def test_unknown_model_and_bad_config(tmp_path):
    with pytest.raises(CollieError, match="unknown model 'llama-9000'"):
        load_config("llama-9000")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CollieError, match="cannot read model config"):
        load_config(str(bad))
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CollieError, match="no 'model_type'"):
        load_config(str(bad))


def test_latent_attention_probe_keeps_a_kv_head_per_query_head():
    """Multi-head latent attention (MiniCPM3) expands K/V to every query head: its probe
    keeps kv heads = heads whatever kv_heads asks, so it builds and trains (with 2 K/V
    heads for 4 query heads it failed in the forward)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from collie_compile.models.probe import probe_config

    cfg = probe_config(AutoConfig.for_model("minicpm3"), heads=4, kv_heads=2)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 4
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.isfinite(AutoModelForCausalLM.from_config(cfg)(input_ids=ids, labels=ids).loss)


def test_a_model_that_is_not_one_stack_is_refused():
    """BLT's config has no num_hidden_layers (three stacks): refused with the reason
    where it was an AttributeError from deep in the profile."""
    from transformers import AutoConfig

    from collie_compile.cost.profile import profile_model
    from collie_compile.models.probe import probe_config

    cfg = probe_config(AutoConfig.for_model("blt"), heads=4, kv_heads=2)
    with pytest.raises(CollieError, match="not one stack of decoder blocks"):
        profile_model(cfg, seq_len=16, dtype="fp32")
