import re

import pytest
import torch

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture
from collie_compile.errors import CaptureError
from collie_compile.models.registry import build_model, load_config

# one family in `make test-fast`, all in the full suite
FAMILIES = ["tiny-llama", *(pytest.param(f, marks=pytest.mark.slow)
                            for f in ("tiny-mistral", "tiny-qwen2", "tiny-gpt2"))]


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_runs_like_eager_for_any_batch_and_seq(name):
    """The captured graph, run on real weights, gives the eager model's loss at sizes other
    than the ones it was traced with: batch and sequence dims are dynamic."""
    torch.manual_seed(0)
    model = build_model(load_config(name), device="cpu")
    ep = capture(model)
    gm = ep.module()
    for batch, seq in [(1, 7), (3, 33)]:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        labels = torch.randint(0, model.config.vocab_size, (batch, seq))
        expected = model(input_ids=ids, labels=labels).loss
        got = gm(input_ids=ids, labels=labels)
        got = got["loss"] if isinstance(got, dict) else got[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_detected_and_identical(name):
    model = build_model(load_config(name))
    ag = annotate(capture(model), model)
    assert ag.num_blocks == model.config.num_hidden_layers == 2
    assert ag.blocks_identical
    assert ag.block_nodes(0) and len(ag.block_nodes(0)) == len(ag.block_nodes(1))


class _Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export cannot trace it
            return x.float().mean()
        return x.float().sum()


class _Uncapturable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.gate = _Gate()

    def forward(self, input_ids, labels=None):
        return self.gate(input_ids)


def test_uncapturable_model_names_module_and_line():
    with pytest.raises(CaptureError) as e:
        capture(_Uncapturable())
    msg = str(e.value)
    assert "module 'gate' (_Gate)" in msg
    assert "if x.sum() > 0" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("model_type,change,says", [
    ("jetmoe", {}, "whose experts do not run through transformers' experts interface"),
    ("qwen3_moe", {"router_jitter_noise": 0.1}, None),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise > 0"),
    ("glm_moe_dsa", {}, "uses sparse attention (model.layers.0.self_attn.indexer"),
    ("deepseek_v2", {}, "top_k=None experts; set num_experts_per_tok in its config")])
def test_experts_the_runtime_cannot_run_exactly_are_refused(model_type, change, says,
                                                            tmp_path, capsys):
    """Mixtures of experts capture (models.experts) unless their experts loop in Python
    (JetMoE), or jitter would stay on in evaluation, or DeepSeek's sparse attention picks
    keys from a mask the capture does not hand it: refused before export, naming the
    layer, from the API and the CLI. (The routers' loss is computed:
    test_expert_parallel.)"""
    from transformers import AutoConfig

    from collie_compile.cli import main
    from collie_compile.models.probe import probe_config

    cfg = probe_config(AutoConfig.for_model(model_type), heads=4, kv_heads=2)
    for k, v in change.items():
        setattr(cfg, k, v)
    if says is None:  # Qwen3-MoE's router has no jitter: the field changes nothing
        capture(build_model(cfg))
        return
    with pytest.raises(CaptureError, match=re.escape(says)):
        capture(build_model(cfg))
    cfg.save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--gpus", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_tensor_constants_made_on_meta_are_measured():
    """GPT-Neo builds its mask value as a tensor constant on the model's (meta) device;
    measuring saved bytes runs it as CPU, as everything else (was a device mismatch)."""
    from transformers import AutoConfig

    from collie_compile.cost.profile import profile_model
    from collie_compile.models.probe import probe_config
    from collie_compile.models.registry import count_params

    cfg = probe_config(AutoConfig.for_model("gpt_neo"), heads=4, kv_heads=2)
    prof = profile_model(cfg, seq_len=16, dtype="fp32")
    assert prof.num_params == count_params(build_model(cfg)) and prof.act_none.sharded > 0


def test_outline_moves_foreign_nodes_out_of_a_block_and_refuses_looped_depth():
    """Nodes that run inside a block's span without belonging to it (a mask's arange
    built on first use: Exaone-4 and ModernBERT under tp) are moved before or after it;
    the outlined graph computes the same logits. A block run twice (Dory's looped
    layers) is refused with that reason."""
    from transformers import AutoConfig

    from collie_compile.capture.export import capture_static
    from collie_compile.errors import CollieError
    from collie_compile.models.probe import probe_config
    from collie_compile.passes.outline_blocks import node_block, outline_blocks

    aten = torch.ops.aten
    torch.manual_seed(0)
    model = build_model(load_config("tiny-llama"), device="cpu").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    from collie_compile.runtime.program import drop_guards

    gm = drop_guards(annotate(capture_static(model, ids), model).gm)
    want = gm(input_ids=ids)
    block0 = [n for n in gm.graph.nodes if node_block(n, "model.layers.") == 0]
    mid = block0[len(block0) // 2]
    with gm.graph.inserting_before(mid):  # reads nothing of the block
        gm.graph.call_function(aten.arange.default, (16,))
    with gm.graph.inserting_after(mid):  # reads the block, read by nothing of it
        gm.graph.call_function(aten.sum.default, (mid,))
    gm.recompile()
    torch.testing.assert_close(outline_blocks(gm, "model.layers.")(input_ids=ids), want)

    cfg = probe_config(AutoConfig.for_model("dory"), heads=4, kv_heads=2)
    dory = build_model(cfg)
    looped = capture_static(dory, torch.zeros(2, 16, dtype=torch.long, device="meta"))
    with pytest.raises(CollieError, match="runs block model.layers.1 2 times a step"):
        outline_blocks(annotate(looped, dory).gm, "model.layers.")


@pytest.mark.parametrize("model_type, prefix", [
    ("opt", "model.decoder.layers."),
    pytest.param("gpt_neox", "gpt_neox.layers.", marks=pytest.mark.slow),
    pytest.param("bloom", "transformer.h.", marks=pytest.mark.slow)])
def test_blocks_found_by_structure_whatever_their_name(model_type, prefix):
    """The decoder blocks are the longest list of same-type modules, wherever the family
    keeps them (no name patterns, so no graph matching is needed to find them)."""
    from transformers import AutoConfig

    from collie_compile.models.probe import probe_config

    cfg = probe_config(AutoConfig.for_model(model_type), layers=3, heads=4, kv_heads=4)
    model = build_model(cfg)
    ag = annotate(capture(model), model)
    assert ag.block_prefix == prefix
    assert ag.num_blocks == 3 and ag.blocks_identical
    assert ag.block_nodes(0) and len(ag.block_nodes(1)) == len(ag.block_nodes(2)) > 0
