import pytest

from collie_compile.cost.hardware import get_gpu
from collie_compile.cost.profile import profile_model
from collie_compile.planner.search import plan
from collie_compile.planner.sharding import linear_layout, solve_block_sharding

H100 = get_gpu("h100-80gb")
MEGATRON = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
            "gate_proj": "column", "up_proj": "column", "down_proj": "row"}


@pytest.mark.parametrize("tp", [2, 8])
def test_sharding_ilp_finds_megatron_layout_for_llama(tp):
    prof = profile_model("llama-2-7b", seq_len=2048, dtype="bf16")
    layout = linear_layout(prof, solve_block_sharding(prof, tp, H100))
    assert {m.rsplit(".", 1)[-1]: s for m, s in layout.items()} == MEGATRON


@pytest.mark.parametrize("tp", [2, 8])
def test_sharding_ilp_finds_megatron_layout_with_grouped_kv_heads(tp):
    """Llama-2-70B's 8 KV heads make v_proj's output 1/8 of q_proj's: once the norm's
    output is gathered for q and k, v reads the same copy, so row-sharding v to skip
    that gather saves nothing (the ILP used to charge the gather once per consumer)."""
    prof = profile_model("llama-2-70b", seq_len=4096, dtype="bf16")
    layout = linear_layout(prof, solve_block_sharding(prof, tp, H100))
    assert {m.rsplit(".", 1)[-1]: s for m, s in layout.items()} == MEGATRON


def test_sharding_ilp_replicates_when_communication_dominates():
    """A 64-wide block: every collective costs more than the compute it would split."""
    prof = profile_model("tiny-llama", seq_len=64, dtype="bf16")
    layout = linear_layout(prof, solve_block_sharding(prof, 2, H100))
    assert set(layout.values()) == {"replicate"}


def test_plan_records_sharding():
    p = plan("llama-2-7b", gpus=8, gpu="h100-80gb", seq_len=2048, tp=2)
    assert {m.rsplit(".", 1)[-1]: s for m, s in p.chosen.sharding.items()} == MEGATRON
    assert not any("sharding" in n for n in p.notes)


def test_fused_qkv_through_chunk_is_sharded(tmp_path):
    """GPT-NeoX splits its fused query_key_value output with chunk (a tuple-valued op);
    the block graph used to name chunk as a producer without a node of its own, so any
    tp > 1 plan of a NeoX model died with KeyError: 'chunk'."""
    import json

    cfg = dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=512,
               intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
               vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
               use_parallel_residual=True, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = plan(str(tmp_path), gpus=2, gpu="a100-80gb", tp=2)
    assert {m.rsplit(".", 1)[-1]: s for m, s in p.chosen.sharding.items()} == {
        "query_key_value": "column", "dense": "row", "dense_h_to_4h": "column",
        "dense_4h_to_h": "row"}
