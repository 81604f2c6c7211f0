"""What a run takes in is honoured or refused, never ignored (issue 31, items 4-6): dropout
off in evaluation as in the HF model's ``eval()``, on in training as in its ``train()``;
position_ids of documents packed into rows; batch keys training does not use; encoder
configs whose attention is bidirectional. Models from transformers' own config classes
and defaults, at two shapes. (The same under tp2·pp2 and dp2·ZeRO-3: test_runtime.py's
EVAL_4 and PACKED_4.)"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from packed_documents import each_document_alone, flattened_rows
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
)

from collie_compile.errors import CollieError

SHAPES = [(2, 16), (4, 8)]  # (global batch, seq)


def gpt2(dropout: float = 0.1) -> torch.nn.Module:
    """GPT-2's defaults: dropout 0.1 on embeddings, attention and residuals (weights
    drawn wider than its init, so that dropout moves the loss visibly)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, initializer_range=0.3,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_evaluation_is_the_model_in_eval_mode_and_training_keeps_dropout(
        group, batch: int, seq: int) -> None:
    from collie_compile import parallelize

    model = gpt2()
    hf = copy.deepcopy(model)
    pm = parallelize(model, gpus=1, seq_len=seq, global_batch_size=batch, optimizer="sgd",
                     lr=0.0)
    x = ids(batch, seq)
    logits = pm.forward(x)
    assert torch.equal(logits, pm.forward(x))  # used to differ by 0.45
    loss_sum, n = pm.eval_loss({"input_ids": x})
    assert (loss_sum, n) == pm.eval_loss({"input_ids": x}) and n == batch * (seq - 1)
    with torch.no_grad():
        want = hf.eval()(input_ids=x, labels=x)
    assert float((logits - want.logits).abs().max()) <= 1e-5 * float(want.logits.abs().max())
    assert loss_sum / n == pytest.approx(float(want.loss), rel=1e-5)
    # training: the same dropout masks as the HF model in train() from the same seed
    hf.train()
    torch.manual_seed(7)
    train_hf = float(hf(input_ids=x, labels=x).loss)
    torch.manual_seed(7)
    train_ours = pm.train_step({"input_ids": x})
    assert train_ours == pytest.approx(train_hf, rel=1e-5)
    torch.manual_seed(8)
    other_masks = float(hf(input_ids=x, labels=x).loss)
    assert abs(train_ours - other_masks) > 1e-3  # dropout did act, and matched


def test_a_batch_key_training_does_not_use_is_refused(group) -> None:
    from collie_compile import parallelize

    pm = parallelize(gpt2(), gpus=1, seq_len=8, global_batch_size=2, optimizer="sgd", lr=0.0)
    x = ids(2, 8)
    before = pm.full_state_dict()
    for extra, says in (({"position_ids": torch.arange(8).repeat(2, 1)},
                         "the batch holds position_ids but this model was parallelized for "
                         "one sequence per row: pass position_ids=True to parallelize"),
                        ({"bogus_key": x}, "the batch holds bogus_key, which training does "
                                           "not use (it takes input_ids, labels, "
                                           "attention_mask, position_ids); remove it"),
                        ({"token_type_ids": x, "pixel_values": x},
                         "the batch holds pixel_values, token_type_ids")):
        for call in (pm.train_step, pm.eval_loss):
            with pytest.raises(CollieError, match=says.replace("(", r"\(").replace(")", r"\)")):
                call({"input_ids": x, **extra})
    after = pm.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CollieError, match="a batch is a dict with input_ids"):
        pm.train_step({"tokens": x})


def packed(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return flattened_rows(batch, seq, 96, 6, seed)


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.parametrize("make", [llama, lambda: gpt2(dropout=0.0)], ids=["llama", "gpt2"])
@pytest.mark.parametrize("batch,seq", SHAPES)
def test_position_ids_keep_packed_documents_apart_as_transformers_does(
        group, make, batch: int, seq: int) -> None:
    """Item 5: position_ids used to be ignored (one causal sequence per row). Two micro-
    batches (so no dropout: they draw other masks than one batch does); loss, every
    gradient and weight after an SGD step against transformers without a KV cache, and
    its logits are each document's alone."""
    from collie_compile import parallelize

    model = make()
    hf = copy.deepcopy(model)
    pm = parallelize(model, gpus=1, seq_len=seq, global_batch_size=batch, optimizer="sgd",
                     lr=0.5, micro_batch_size=batch // 2, position_ids=True)
    b = packed(batch, seq)
    assert (b["position_ids"] == 0).sum() > batch  # rows hold several documents
    torch.manual_seed(7)
    ours = pm.train_step(b)
    torch.manual_seed(7)
    want = hf(**b, use_cache=False)
    want.loss.backward()
    assert ours == pytest.approx(float(want.loss), rel=1e-6)
    grads = pm.full_state_dict(grads=True)
    for name, p in hf.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-6), name
    with torch.no_grad():
        for p in hf.parameters():
            p -= 0.5 * p.grad
    weights = pm.full_state_dict()
    for name, p in hf.named_parameters():
        assert torch.allclose(weights[name], p, rtol=1e-5, atol=1e-6), name
    hf.eval()
    e = packed(batch, seq, seed=1)
    logits = pm.forward(e["input_ids"], e["position_ids"])
    with torch.no_grad():
        ref = hf(**e, use_cache=False)
    alone = each_document_alone(hf, e["input_ids"][0], e["position_ids"][0])
    assert float((ref.logits[0] - alone).abs().max()) < 1e-5  # what packing means
    assert float((logits - ref.logits).abs().max()) <= 1e-5 * float(ref.logits.abs().max())
    total, n = pm.eval_loss(e)
    assert n == int((e["labels"][:, 1:] != -100).sum())
    assert total / n == pytest.approx(float(ref.loss), rel=1e-5)
    # no position_ids: 0..seq-1 in every row, as transformers numbers them
    plain = ids(batch, seq)
    with torch.no_grad():
        assert torch.allclose(pm.forward(plain), hf(input_ids=plain).logits, atol=1e-5)


def test_position_ids_that_cannot_be_honoured_are_refused(group) -> None:
    from collie_compile import parallelize

    pm = parallelize(llama(), gpus=1, seq_len=8, global_batch_size=2, optimizer="sgd",
                     lr=0.1, position_ids=True)
    b = packed(2, 8)
    before = pm.full_state_dict()
    for change, says in (
            ({"attention_mask": torch.ones(2, 8)}, "give position_ids (packed documents) or "
             "attention_mask (padded rows), not both"),
            ({"position_ids": b["position_ids"][:, :4]}, "position_ids must have the shape "
             "of input_ids [2, 8], got [2, 4]"),
            ({"position_ids": b["position_ids"] - 1}, "position_ids hold -1: positions count "
             "from 0"),
            ({"position_ids": b["position_ids"] + 40}, "past the model's 32 positions"),
            ({"position_ids": b["position_ids"].float()}, "position_ids must be integers")):
        with pytest.raises(CollieError, match=re.escape(says)):
            pm.train_step({**b, **change})
    after = pm.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # BLOOM places tokens by ALiBi from the mask: its forward takes no position_ids
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=96, hidden_size=32,
                                                         n_layer=2, n_head=4))
    with pytest.raises(CollieError, match="BloomForCausalLM takes no position_ids"):
        parallelize(bloom, gpus=1, seq_len=8, global_batch_size=2, position_ids=True)


def test_an_encoder_config_is_refused_as_a_causal_lm(tmp_path: Path, capsys) -> None:
    """BERT's causal-LM class attends both ways unless is_decoder is set: it used to
    estimate and train as if causal."""
    from collie_compile.cli import main

    enc, dec = tmp_path / "bert", tmp_path / "bert-decoder"
    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)
    BertConfig(**small).save_pretrained(enc)
    BertConfig(**small, is_decoder=True).save_pretrained(dec)
    rc = main(["estimate", str(enc), "--gpus", "1", "--seq-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert ("BertLMHeadModel attends in both directions" in err[0]
            and '"is_decoder": true' in err[0]), err
    assert main(["estimate", str(dec), "--gpus", "1", "--seq-len", "16"]) == 0


def test_one_line_errors_and_what_a_plan_file_decided(group, tmp_path: Path,
                                                     capsys) -> None:
    """Issue 31 item 13: a raw TypeError for a misspelt optimizer option; --gpu ignored
    beside --plan; the optimizer and dtype a plan file decided never printed; --tp 2 in
    one process not saying to launch under torchrun."""
    from collie_compile import parallelize
    from collie_compile.cli import main

    with pytest.raises(CollieError, match=r"adamw takes .*betas.* in optimizer_kwargs, not "
                                          r"betaz"):
        parallelize(gpt2(), gpus=1, seq_len=8, global_batch_size=2,
                    optimizer_kwargs={"betaz": 1})
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 40)
    plan = tmp_path / "p.json"
    assert main(["plan", "tiny-llama", "--gpus", "1", "--gpu", "a100-80gb", "--seq-len", "16",
                 "--global-batch", "2", "--out", str(plan)]) == 0
    capsys.readouterr()
    run = ["train", "tiny-llama", "--data", str(data), "--steps", "1"]
    assert main([*run, "--plan", str(plan), "--gpu", "h100-80gb"]) == 2
    assert "gpu='h100-80gb' (plan: 'a100-80gb')" in capsys.readouterr().err
    assert main([*run, "--plan", str(plan)]) == 0
    assert (f"from {plan}: adamw, bf16, seq 16, global batch 2, planned for 1 x a100-80gb"
            in capsys.readouterr().out)
    assert main([*run, "--tp", "2", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("tp=2 needs at least 2 processes and this is one; launch it "
                              "under torchrun --nproc-per-node 2") in err[0], err
