import pytest

from collie_compile.cost.estimate import estimate
from collie_compile.cost.hardware import GiB
from collie_compile.cost.memory import Layout, MemoryModel, backward_grads
from collie_compile.cost.profile import profile_model
from collie_compile.layout import even_split
from collie_compile.optim.specs import get_optimizer


def _states(mem):
    return mem.params_bytes + mem.grads_bytes + mem.optimizer_bytes


@pytest.mark.parametrize("zero,per_param", [
    # ZeRO-2 as FSDP2 runs it keeps each 2-byte weight shard beside the gathered copy:
    # 2Ψ/d more than the paper's 2 + 14/d (measured per rank by the estimate suite)
    (0, lambda d: 16), (1, lambda d: 4 + 12 / d), (2, lambda d: 2 + 16 / d),
    (3, lambda d: 16 / d)])
def test_zero_model_states_match_paper(zero, per_param):
    """Mixed-precision AdamW model states per GPU: the ZeRO paper's formulas."""
    prof = profile_model("llama-2-7b", seq_len=16, dtype="bf16")
    d = 8
    mem = MemoryModel(prof, get_optimizer("adamw")).estimate(
        Layout(dp=d, zero=zero, seq_len=16))
    assert mem.moment == "step"  # all gradients present at the optimizer step
    psi = prof.num_params
    assert _states(mem) == pytest.approx(per_param(d) * psi, rel=1e-6, abs=16)


@pytest.mark.parametrize("zero,opt,kept", [
    (0, "adamw", True), (1, "adamw", True), (2, "adamw", False), (0, "lomo", False)])
def test_zero_0_1_gradients_stay_in_flat_buffers(zero, opt, kept):
    """ZeRO 0/1 keep gradients in persistent flat buffers (all-reduced in place), so they
    are there when the step's first backward starts; FSDP2 and the fused rules free
    theirs. Measured per rank in the estimate suite."""
    prof = profile_model("tiny-llama", seq_len=64, dtype="fp32")
    terms = MemoryModel(prof, get_optimizer(opt)).stage_terms(
        Layout(dp=4, zero=zero, seq_len=64), 0, True, True)
    first = terms.moments({"none": prof.num_layers})["first"]
    assert (first[1] > 0) == kept


@pytest.mark.parametrize("opt,per_param", [
    ("adamw", 16), ("sgd", 8), ("lion", 12), ("adan", 24), ("sophia", 16)])
def test_optimizer_bytes_per_param(opt, per_param):
    prof = profile_model("llama-2-7b", seq_len=16, dtype="bf16")
    mem = MemoryModel(prof, get_optimizer(opt)).estimate(Layout(seq_len=16))
    assert _states(mem) == pytest.approx(per_param * prof.num_params, rel=1e-6)


def test_lomo_keeps_no_gradients_or_states():
    prof = profile_model("llama-2-7b", seq_len=16, dtype="bf16")
    mem = MemoryModel(prof, get_optimizer("lomo")).estimate(Layout(seq_len=16))
    assert mem.optimizer_bytes == 0 and mem.grads_bytes == 0
    assert mem.params_bytes == 2 * prof.num_params
    # AdaLomo: O(rows + cols) per matrix, a sliver of the weights
    ada = MemoryModel(prof, get_optimizer("adalomo")).estimate(Layout(seq_len=16))
    assert 0 < ada.optimizer_bytes < 0.01 * mem.params_bytes


def test_lomo_paper_anchors():
    """LLaMA-7B on one GPU: AdamW needs ~102 GB of model states, LOMO ~14.6 GB in all
    (LOMO paper, fp16, micro-batch 1, seq 512, recomputation on)."""
    adamw = estimate("llama-7b", gpu="a100-80gb", optimizer="adamw", dtype="fp16",
                     seq_len=512, recompute="full")
    lomo = estimate("llama-7b", gpu="a100-80gb", optimizer="lomo", dtype="fp16",
                    seq_len=512, recompute="full")
    assert _states(adamw.memory) / GiB == pytest.approx(102.2, rel=0.05)
    assert lomo.memory.total_bytes / GiB == pytest.approx(14.6, rel=0.15)


def test_65b_on_8_rtx3090_lomo_fits_adamw_does_not():
    kw = dict(gpus=8, gpu="rtx3090", zero=3, seq_len=512, micro_batch_size=1,
              recompute="full", dtype="bf16")
    adamw = estimate("llama-65b", optimizer="adamw", **kw)
    lomo = estimate("llama-65b", optimizer="lomo", **kw)
    assert not adamw.fits and lomo.fits
    assert adamw.memory.total_bytes > 4 * adamw.gpu.memory_bytes


def test_pipeline_first_stage_holds_most_activations():
    prof = profile_model("llama-2-7b", seq_len=1024, dtype="bf16")
    mm = MemoryModel(prof, get_optimizer("adamw"))
    lay = Layout(pp=4, num_microbatches=8, seq_len=1024)
    acts = [mm.estimate_stage(lay, k) for k in range(4)]
    blocks = even_split(prof.num_layers, 4)
    per_block = prof.act_none.per_rank(1)
    hidden = 1024 * prof.hidden_size * 2  # one micro-batch's stage output / input
    # 1F1B: stage k holds pp - k micro-batches, each with its stage output (kept by
    # torch's pipelining for backward); 8 gradient receive buffers on all but the last
    # stage, 8 input receive buffers on all but the first (the in-flight ones saved)
    assert acts[0].activations_bytes == pytest.approx(
        4 * (blocks[0] * per_block + prof.act_embed + hidden) + 8 * hidden
        + prof.act_fixed, rel=1e-9)
    assert acts[1].activations_bytes == pytest.approx(
        3 * (blocks[1] * per_block + hidden) + (8 + 8 - 3) * hidden + prof.act_fixed,
        rel=1e-9)
    logits = 1024 * prof.vocab_size * 2  # the last stage keeps its output, the logits
    assert acts[3].activations_bytes == pytest.approx(
        blocks[3] * per_block + prof.act_head + logits + (8 - 1) * hidden + prof.act_fixed,
        rel=1e-9)
    # tp shards weights and the sharded part of the activations
    tp2 = mm.estimate(Layout(tp=2, seq_len=1024))
    tp1 = mm.estimate(Layout(tp=1, seq_len=1024))
    assert tp2.params_bytes < 0.51 * tp1.params_bytes


@pytest.mark.parametrize("schedule,m,sets_later", [
    ("gpipe", 4, 3),  # all forwards, then backwards: each frees one micro-batch's set
    ("1f1b", 2, 1),   # pp=2, stage 0 holds both micro-batches: same
    ("1f1b", 8, 2),   # steady 1F1B: a forward refills the set a backward freed
])
def test_later_backward_holds_gradients_beside_fewer_activations(schedule, m, sets_later):
    """A step's first backward has every in-flight micro-batch's activations and no
    gradients; a later one has the accumulated gradients, beside one set fewer when no
    forward runs between backwards."""
    prof = profile_model("llama-2-7b", seq_len=128, dtype="bf16")
    mm = MemoryModel(prof, get_optimizer("adamw"))
    lay = Layout(pp=2, num_microbatches=m, seq_len=128, schedule=schedule)
    terms = mm.stage_terms(lay, 0, True, False)
    n = prof.num_layers // 2
    in_flight = terms.acts[0] + n * terms.acts[1]["none"]
    sets = m if schedule == "gpipe" else 2
    one_set = in_flight / sets
    first, later, _ = terms.moments({"none": n}).values()
    assert first[1] == 0 and first[3] == pytest.approx(terms.act_kept + in_flight)
    assert later[1] == pytest.approx(terms.grads_f[0] + n * terms.grads_f[1])
    assert later[3] == pytest.approx(terms.act_kept + sets_later * one_set)


@pytest.mark.parametrize("zero", [2, 3])
def test_pipelined_fsdp_holds_whole_gradients_until_the_step(zero):
    """torch.distributed.pipelining turns FSDP2's gradient sync off until the last
    backward (and keeps ZeRO-3's gathered weights): a pp stage holds whole gradients at
    its later moments; without pp FSDP2 reduce-scatters each micro-batch, so they stay
    sharded. Measured per rank in the estimate suite."""
    prof = profile_model("tiny-llama", seq_len=64, dtype="fp32")
    mm = MemoryModel(prof, get_optimizer("adamw"))
    d, n = 2, prof.num_layers // 2
    whole = (mm.end_params_per_rank(1, True, False) + n * mm.block_params_per_rank(1)) * 4
    piped = mm.stage_terms(Layout(dp=d, pp=2, zero=zero, num_microbatches=4, seq_len=64),
                           0, True, False).moments({"none": n})
    flat = mm.stage_terms(Layout(dp=d, pp=1, zero=zero, num_microbatches=4, seq_len=64),
                          0, True, False).moments({"none": n})
    for moment in ("later", "step"):
        assert piped[moment][1] == pytest.approx(whole)
        assert flat[moment][1] == pytest.approx(whole / d)
    weights = piped["first"][0]
    assert piped["later"][0] == pytest.approx(whole if zero == 3 else weights)


def test_block_backward_holds_the_gated_mlp_input_gradients():
    """In a Llama block the widest backward op is the gated MLP's product: it makes the
    gradients of both [s, intermediate] inputs while the residual stream's waits."""
    prof = profile_model("small-llama", seq_len=128, dtype="fp32")
    inter = 1024  # small-llama's intermediate size
    assert backward_grads(prof).sharded == 2 * 128 * inter * 4
    assert backward_grads(prof).replicated == 128 * prof.hidden_size * 4


def test_embedding_and_head_split_over_tp_only_where_the_runtime_splits_them():
    """The runtime makes embedding and LM head vocabulary-parallel only when tp divides
    the vocabulary and the head is not tied to the embedding; otherwise every rank holds
    them whole (and the whole logits), which the model used to divide by tp anyway."""
    adamw = get_optimizer("adamw")
    untied = profile_model("tiny-llama", seq_len=16, dtype="fp32")
    tied = profile_model("tiny-gpt2", seq_len=16, dtype="fp32")
    assert tied.tied_params > 0 and untied.tied_params == 0
    u, t = MemoryModel(untied, adamw), MemoryModel(tied, adamw)
    ends = untied.embed_params + untied.head_params
    assert u.end_params_per_rank(2, True, True) == ends / 2
    assert t.end_params_per_rank(2, True, True) == tied.embed_params + tied.head_params
    # 256 tokens do not split 3 ways: whole again (heads allowing, the runtime would run it)
    assert u.end_params_per_rank(3, True, True) == ends
    # whole logits on the last stage: its loss transients do not shrink with tp
    lay = dict(seq_len=16, micro_batch_size=2)
    head_tmp = [t.stage_terms(Layout(tp=n, **lay), 0, True, True).head_tmp for n in (1, 2)]
    assert head_tmp[0] == head_tmp[1] > 0
