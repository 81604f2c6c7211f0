"""Each graph pass on its own, in one process, on real captured transformers models: the
rewritten program computes what the captured one did, and what a pass records about it
(shards, stage boundaries) is right."""

import pytest
import torch
from torch import fx
from transformers import AutoConfig

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture_static
from collie_compile.errors import CollieError
from collie_compile.models.probe import probe_config
from collie_compile.models.registry import build_model, load_config, with_layers
from collie_compile.passes.outline_blocks import outline_blocks
from collie_compile.passes.pipeline_split import pipeline_split
from collie_compile.passes.subgraph import extract, live_in, live_out
from collie_compile.passes.tensor_parallel import tensor_parallel, tp_record
from collie_compile.runtime.program import drop_guards, head_layout, tp_layout

PREFIX = "model.layers."


def _captured(cfg: object, batch: int = 2, seq: int = 16) -> tuple:
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").eval()
    ids = torch.randint(0, int(cfg.vocab_size), (batch, seq),
                        generator=torch.Generator().manual_seed(1))
    ag = annotate(capture_static(model, ids), model)
    return model, ag, drop_guards(ag.gm), ids


def test_subgraph_extract_computes_the_nodes_from_their_live_inputs():
    def f(x: torch.Tensor) -> torch.Tensor:
        a = x + 1
        b = a * 2
        c = b.relu()
        return c - a

    gm = fx.symbolic_trace(f)
    by = {n.name: n for n in gm.graph.nodes}
    run = [by["mul"], by["relu"]]
    assert live_in(run) == [by["add"]]
    assert live_out(run) == [by["relu"]]  # mul is used only inside the run
    sub = extract(gm, run, [by["add"]], (by["relu"],), name="Sub")
    a = torch.randn(5)
    (got,) = sub(a)
    torch.testing.assert_close(got, (a * 2).relu())


def test_outline_blocks_installs_each_block_at_its_path_and_keeps_the_logits():
    model, ag, gm, ids = _captured(with_layers(load_config("tiny-llama"), 3))
    want = gm(input_ids=ids)
    names = {n for n, _ in gm.named_parameters()}
    out = outline_blocks(gm, PREFIX)
    for i in range(3):
        assert isinstance(out.get_submodule(f"model.layers.{i}"), fx.GraphModule)
    assert {n for n, _ in out.named_parameters()} == names  # parameter names unchanged
    calls = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert [t for t in calls if t.startswith(PREFIX)] == [f"model.layers.{i}" for i in range(3)]
    torch.testing.assert_close(out(input_ids=ids), want)


def test_pipeline_split_stages_chained_compute_the_whole_graph():
    model, ag, gm, ids = _captured(with_layers(load_config("tiny-llama"), 4))
    want = gm(input_ids=ids)
    gm = outline_blocks(gm, PREFIX)
    stages = pipeline_split(gm, PREFIX, [[0, 0], [1, 2], [3, 3]])
    assert len(stages) == 3
    held = [{n for n, _ in st.named_parameters()} for st in stages]
    assert not (held[0] & held[1]) and not (held[1] & held[2]) and not (held[0] & held[2])
    assert set().union(*held) == {n for n, _ in gm.named_parameters()}
    assert "model.embed_tokens.weight" in held[0] and "lm_head.weight" in held[2]
    assert any(n.startswith("model.layers.1.") for n in held[1])
    acts = stages[0](ids)
    for st in stages[1:]:
        assert all(t.is_contiguous() for t in acts)  # what goes point to point
        acts = st(*acts)
    logits = acts[0] if isinstance(acts, (tuple, list)) else acts
    torch.testing.assert_close(logits, want.logits)
    with pytest.raises(RuntimeError, match="block 3 is in no pipeline stage"):
        pipeline_split(gm, PREFIX, [[0, 1], [2, 2]])


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_tensor_parallel_slices_reassemble_every_weight(family):
    """Each tp rank's slice of every sharded weight (Phi-3 fuses q|k|v and gate|up in one
    weight: sliced part by part) put back together by its recorded Shard is the
    original weight; weights not recorded are left whole."""
    cfg = probe_config(AutoConfig.for_model(family), heads=4, kv_heads=2)
    model, ag, gm, ids = _captured(cfg)
    full = {n: p.detach().clone() for n, p in gm.named_parameters()}
    tp = 2
    ranks = []
    for rank in range(tp):
        _, ag_r, gm_r, _ = _captured(cfg)
        layout = tp_layout(ag_r, cfg, tp, False)
        gm_r = tensor_parallel(gm_r, layout, None, rank, tp, *head_layout(cfg))
        ranks.append((tp_record(gm_r), dict(gm_r.named_parameters())))
    shards = ranks[0][0].shards
    assert shards and ranks[1][0].shards.keys() == shards.keys()
    assert any("q_proj" in n or "qkv_proj" in n for n in shards)
    for name, whole in full.items():
        local = [params[name].detach() for _, params in ranks]
        if name in shards:
            assert local[0].shape[shards[name].dim] < whole.shape[shards[name].dim]
            torch.testing.assert_close(shards[name].assemble(local), whole, rtol=0, atol=0)
        else:
            assert all(torch.equal(t, whole) for t in local), name


def test_tensor_parallel_refuses_a_split_it_cannot_follow():
    """A split along a dim tp shrank, other than a fused projection's own cuts, would
    give each rank the wrong features (DiffLlama's two halves of all heads): refused,
    naming the op's module."""
    cfg = probe_config(AutoConfig.for_model("diffllama"), heads=4, kv_heads=2)
    _, ag, gm, _ = _captured(cfg)
    with pytest.raises(CollieError, match="cuts a dim that tp splits"):
        tensor_parallel(gm, tp_layout(ag, cfg, 2, False), None, 0, 2, *head_layout(cfg))


def test_the_rank_program_names_a_failing_pass(tmp_path):
    """A bug inside a pass says which pass; a refusal keeps its message, led by the pass."""
    import torch.distributed as dist

    from collie_compile.runtime.program import apply_pass

    def refuse() -> None:
        raise CollieError("no stage holds block 3")

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="pass outline_blocks failed: KeyError"):
            apply_pass("outline_blocks", lambda: {}["block"])
        with pytest.raises(CollieError, match="^pipeline_split: no stage holds block 3$"):
            apply_pass("pipeline_split", refuse)
        assert apply_pass("lora", lambda: 7) == 7
    finally:
        dist.destroy_process_group()
