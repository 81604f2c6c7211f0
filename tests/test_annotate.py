import math

import pytest
import torch

from collie_compile.capture.annotate import annotate, measure_saved
from collie_compile.capture.export import capture
from collie_compile.cost.profile import profile_model
from collie_compile.models.registry import build_model, load_config


@pytest.fixture(scope="module")
def llama():
    model = build_model(load_config("tiny-llama"))
    return model, annotate(capture(model), model)


def test_linear_and_attention_flops(llama):
    model, ag = llama
    b, s = 3, 10
    block = model.model.layers[0]
    linear_params = sum(m.weight.numel() for m in block.modules()
                        if isinstance(m, torch.nn.Linear))
    lin = sum(ag.subs(n.flops, b, s) for n in ag.block_nodes(0) if n.kind == "linear")
    assert lin == 2 * b * s * linear_params
    cfg = model.config
    att = sum(ag.subs(n.flops, b, s) for n in ag.block_nodes(0) if n.kind == "attention")
    assert att == 4 * b * cfg.num_attention_heads * s * s * (cfg.hidden_size //
                                                             cfg.num_attention_heads)


def test_nodes_know_module_and_params(llama):
    _, ag = llama
    q = [n for n in ag.block_nodes(1) if n.module == "model.layers.1.self_attn.q_proj"]
    assert len(q) == 1 and q[0].kind == "linear"
    assert q[0].params == ["model.layers.1.self_attn.q_proj.weight"]
    assert ag.nodes[q[0].name].shape[-1] == 64


def test_sharded_region_between_column_and_row_linears(llama):
    _, ag = llama
    by_module = {}
    for n in ag.block_nodes(0):
        by_module.setdefault(n.module.rsplit(".", 1)[-1], []).append(n)
    for col in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert all(n.sharded for n in by_module[col]), col
    for row in ("o_proj", "down_proj", "input_layernorm", "post_attention_layernorm"):
        assert not any(n.sharded for n in by_module[row]), row
    sdpa = [n for n in ag.block_nodes(0) if n.kind == "attention"]
    assert sdpa and all(n.sharded for n in sdpa)


def test_saved_bytes_linear_in_batch(llama):
    _, ag = llama
    one, two, four = (measure_saved(ag, b, 32) for b in (1, 2, 4))
    per = two.block_sharded - one.block_sharded
    assert per > 0 and four.block_sharded - two.block_sharded == 2 * per
    assert four.block_replicated - two.block_replicated == 2 * (
        two.block_replicated - one.block_replicated)


def test_recompute_modes_keep_less():
    p = profile_model("tiny-llama", seq_len=32, dtype="fp32")
    none, sel, full = (p.activations(m) for m in ("none", "selective", "full"))
    assert full.replicated == 32 * p.hidden_size * 4 and full.sharded == 0
    total = [a.replicated + a.sharded for a in (none, sel, full)]
    assert total[0] > total[1] > total[2]
    # tensor parallelism divides the sharded part only
    assert none.per_rank(2) == none.replicated + none.sharded / 2


@pytest.mark.slow
def test_profile_cached_on_disk_and_corruption_ignored(tmp_path, monkeypatch):
    from collie_compile.cost import profile as modelprofile

    monkeypatch.setenv("COLLIE_COMPILE_CACHE", str(tmp_path))
    modelprofile._cached_profile.cache_clear()
    first = profile_model("tiny-gpt2", seq_len=48, dtype="fp32")
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    modelprofile._cached_profile.cache_clear()
    assert profile_model("tiny-gpt2", seq_len=48, dtype="fp32") == first  # from disk
    files[0].write_text("{garbage")
    modelprofile._cached_profile.cache_clear()
    assert profile_model("tiny-gpt2", seq_len=48, dtype="fp32") == first  # measured again


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["smollm3", "modernbert-decoder", "gpt_neox_japanese"])
def test_heterogeneous_stack_priced_by_its_costliest_block(model_type):
    """Blocks that differ (layers without RoPE, a norm or a bias on some layers only)
    are profiled, not refused: the parameter count is the real model's and the priced
    block costs at least as much as each block of the probe."""
    from transformers import AutoConfig

    from collie_compile.models.probe import probe_config
    from collie_compile.models.registry import count_params

    cfg = probe_config(AutoConfig.for_model(model_type), heads=4, kv_heads=2)
    prof = profile_model(cfg, seq_len=16, dtype="fp32")
    assert prof.num_params == count_params(build_model(cfg))
    probe = build_model(cfg)
    ag = annotate(capture(probe, max_seq=16), probe)
    assert not ag.blocks_identical
    for i in range(ag.num_blocks):
        params = {p for n in ag.block_nodes(i) for p in n.params}
        assert prof.block_params >= sum(math.prod(ag.param_shapes[p]) for p in params)
        assert prof.block_flops >= ag.flops(1, 16, i)
