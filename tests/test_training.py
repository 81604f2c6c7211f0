"""The training loop as users run it: a model built from a transformers config, a
tokenizer folder and JSON Lines chat data; learning-rate schedules, loss masks,
evaluation, and (on 4 gloo ranks) checkpoints that survive SIGKILL, also mid-save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from training_data import chat_records, make_tokenizer, write_jsonl

from collie_compile.data.packing import IGNORE_INDEX, PackedTokens
from collie_compile.data.tokenize import Encoder, tokenized, tokenizer_files
from collie_compile.optim.schedules import SCHEDULES, LRSchedule
from collie_compile.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
SEQ = 16


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-block Llama from its config, as a user makes one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    tiny_llama().config.save_pretrained(d / "model")
    return {"tok": make_tokenizer(d / "tok"), "model": d / "model",
            "train": write_jsonl(d / "chat.jsonl", chat_records(60)),
            "eval": write_jsonl(d / "eval.jsonl", chat_records(12, seed=1))}


def packed(path: Path, tok: Path, seq: int = SEQ) -> PackedTokens:
    return PackedTokens.from_cache(tokenized([path], Encoder(tok, 64), log=lambda s: None),
                                   "train", seq)


def one_process(optimizer: str, seq: int = SEQ, batch: int = 2, lr: float = 1e-3) -> object:
    from collie_compile import parallelize

    return parallelize(tiny_llama(), gpus=1, optimizer=optimizer, lr=lr, seq_len=seq,
                       global_batch_size=batch, dp=1, tp=1, pp=1)


def torch_schedule_lrs(opt: torch.optim.Optimizer, s: LRSchedule) -> list[float]:
    """The rates torch's own schedulers give each of ``s.steps`` updates."""
    from torch.optim import lr_scheduler as L

    parts, milestones, w = [], [], s.warmup_steps
    if w:
        parts.append(L.LinearLR(opt, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w))
        milestones.append(w)
    n, end = s.steps - w, s.min_lr / s.lr
    if s.kind == "constant":
        parts.append(L.ConstantLR(opt, factor=1.0, total_iters=0))
    elif s.kind == "linear":
        parts.append(L.LinearLR(opt, start_factor=1.0, end_factor=end, total_iters=n))
    elif s.kind == "cosine":
        parts.append(L.CosineAnnealingLR(opt, T_max=n, eta_min=s.min_lr))
    else:  # wsd
        parts.append(L.ConstantLR(opt, factor=1.0, total_iters=0))
        milestones.append(s.steps - s.decay())
        d = s.decay()  # the last update at min_lr
        parts.append(L.LinearLR(opt, start_factor=1 - (1 - end) / d, end_factor=end,
                                total_iters=max(d - 1, 1)))
    sched = parts[0] if len(parts) == 1 else L.SequentialLR(opt, parts, milestones)
    lrs = []
    for _ in range(s.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "lomo"])
def test_logged_learning_rates_are_torch_schedulers(group, files, tmp_path: Path,
                                                    optimizer: str) -> None:
    """Every built-in schedule: the rate each step logs (and sets) equals torch's
    LinearLR/CosineAnnealingLR/ConstantLR under SequentialLR driving the same optimizer
    class; and the rate set is the one the update uses (lr 0: no weight moves)."""
    from collie_compile.optim.in_backward import LOMO

    pm = one_process(optimizer)
    data = packed(files["train"], files["tok"])
    for kind in SCHEDULES:
        s = LRSchedule(1e-3, 9, kind, warmup_steps=2, min_lr=1e-4,
                       decay_steps=3 if kind == "wsd" else None)
        out = tmp_path / kind
        Trainer(pm, data, steps=9, schedule=s, output=out, tensorboard=False).fit()
        logged = [r["lr"] for r in metrics(out) if "loss" in r]
        p = torch.nn.Parameter(torch.zeros(2))
        cls = LOMO if optimizer == "lomo" else torch.optim.AdamW
        reference = torch_schedule_lrs(cls([p], lr=1e-3), s)
        assert logged == pytest.approx(reference, rel=1e-12, abs=0), kind
        assert logged[:2] == pytest.approx([1e-3 / 3, 2e-3 / 3]) and max(logged) == 1e-3
        if kind == "wsd":  # ended at 36% of the peak, not at --min-lr
            assert logged[-1] == pytest.approx(1e-4, rel=1e-12)
    before = pm.full_state_dict()
    pm.set_lr(0.0)
    assert pm.lr == 0.0
    pm.train_step(data.batch(0, 2))
    after = pm.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pm.set_lr(1e-3)
    pm.train_step(data.batch(0, 2))
    assert not torch.equal(after["model.norm.weight"], pm.full_state_dict()["model.norm.weight"])


def test_prompt_tokens_do_not_count(group, files, tmp_path: Path) -> None:
    """Two prompt/completion records packed in one row: the first step's loss equals a
    hand computation over the completion tokens (and the EOS after each) alone."""
    from transformers import AutoTokenizer

    records = [{"prompt": "where is the cat ? ", "completion": "on the mat ."},
               {"prompt": "what is red ? ", "completion": "the big dog ."}]
    data = packed(write_jsonl(tmp_path / "pc.jsonl", records), files["tok"], seq=32)
    tok = AutoTokenizer.from_pretrained(files["tok"])
    stream, counts = [], []
    for r in records:
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"]
        stream += p + c + [tok.eos_token_id]
        counts += [False] * len(p) + [True] * (len(c) + 1)
    assert len(stream) < 32
    reference = tiny_llama()
    logits = reference(input_ids=torch.tensor([stream])).logits[0].detach()
    targets = [t for t in range(len(stream) - 1) if counts[t + 1]]
    hand = torch.nn.functional.cross_entropy(
        logits[targets], torch.tensor([stream[t + 1] for t in targets])).detach()
    pm = one_process("adamw", seq=32, batch=1)
    batch = data.batch(0, 1)
    assert batch["input_ids"][0, :len(stream)].tolist() == stream
    assert (batch["labels"][0] != IGNORE_INDEX).sum() == sum(counts) == len(targets) + 0
    loss = pm.train_step(batch)
    assert loss == pytest.approx(float(hand), rel=1e-6)
    unmasked = torch.nn.functional.cross_entropy(logits[:len(stream) - 1],
                                                 torch.tensor(stream[1:]))
    assert abs(loss - float(unmasked)) > 1e-3  # the mask changes the loss


def test_evaluation_never_updates_and_equals_one_process(group, files) -> None:
    """LOMO updates inside backward: evaluation runs forward only, so weights stay, and
    its loss is the plain model's mean token loss over every held-out sequence."""
    from transformers import AutoModelForCausalLM

    pm = one_process("lomo", lr=1e-2)
    data = packed(files["train"], files["tok"])
    held = packed(files["eval"], files["tok"])
    trainer = Trainer(pm, data, steps=2, eval_data=held)
    trainer.fit()
    before = pm.full_state_dict()
    result = trainer.evaluate()
    after = pm.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_config(tiny_llama().config)
    model.load_state_dict(before)
    rows = held.rows(list(range(held.num_sequences)))
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"]).logits[:, :-1]
    labels = rows["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    assert result["eval_tokens"] == int((labels != IGNORE_INDEX).sum())
    assert result["eval_loss"] == pytest.approx(float(total) / result["eval_tokens"], rel=1e-5)


def test_metrics_reach_jsonl_and_tensorboard(group, files, tmp_path: Path) -> None:
    """Each step's record has what the issue lists (grad norm where clipping computes it),
    and TensorBoard gets the same scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from collie_compile import parallelize

    pm = parallelize(tiny_llama(), gpus=1, optimizer="adamw", seq_len=SEQ, global_batch_size=2,
                     max_grad_norm=0.5, dp=1, tp=1, pp=1)
    out = tmp_path / "m"
    losses = Trainer(pm, packed(files["train"], files["tok"]), steps=3, output=out,
                     tensorboard=True).fit()
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["loss"] for r in steps] == losses
    for r in steps:
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["tokens_per_s_per_gpu"] == r["tokens_per_s"] and 0 < r["mfu"] < 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3]


def test_lora_run_resumes_to_the_same_losses(group, files, tmp_path: Path) -> None:
    """LoRA with AdamW in one process: resumed from step 2's checkpoint, steps 3-4 give the
    uninterrupted run's losses exactly, and the final folder is a PEFT adapter."""
    from collie_compile import parallelize

    data = packed(files["train"], files["tok"])
    schedule = LRSchedule(1e-2, 4, "linear", warmup_steps=1)

    def run(output: Path) -> list[float]:
        pm = parallelize(tiny_llama(), gpus=1, optimizer="adamw", seq_len=SEQ,
                         global_batch_size=2, lora_rank=4, dp=1, tp=1, pp=1)
        losses = Trainer(pm, data, steps=4, schedule=schedule, output=output, save_every=2,
                         tensorboard=False).fit()
        pm.save_pretrained(output / "final")
        return losses

    out = tmp_path / "lora"
    whole = run(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    assert run(out) == whole[2:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from collie_compile.cli import main

    rc = main(["train", *args])
    return rc, capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(group, files, tmp_path: Path,
                                                  capsys) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"x": "the cat"}\n{"x": "a dog"\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = [str(files["model"]), "--tokenizer", str(files["tok"]), "--steps", "2",
            "--seq-len", str(SEQ), "--global-batch", "2"]
    cases = {
        "missing field": (["--data", str(files["train"]), "--text-field", "body"],
                          f"{files['train']}:1: no field 'body'"),
        "malformed JSON": (["--data", str(bad_json), "--text-field", "x"],
                           f"{bad_json}:2: not a JSON object"),
        "empty file": (["--data", str(empty)], "no tokens to train on"),
        "no tokenizer": (["--data", str(files["train"]), "--tokenizer", str(tmp_path / "t")],
                         "tokenizer folder"),
        "eval-every alone": (["--data", str(files["train"]), "--eval-every", "2"],
                             "--eval-every needs evaluation data"),
    }
    for name, (args, expected) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        rc, err = _cli([*base, *args, "--output", str(out), "--save-every", "1"], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and expected in lines[0], (name, err)
        assert lines[0].startswith("collie-compile: error: ") and "Traceback" not in err
        assert not out.exists(), name


def test_lora_on_weights_from_disk_matches_peft_and_saves_usable_folders(
        group, files, tmp_path: Path, capsys) -> None:
    """`train DIR --weights DIR --lora-rank 4` failed ("DIR has no weight
    '...q_proj.lora_A.weight'"); --check with --weights trained random weights in its one
    process; a saved model lacked its tokenizer, so pipeline() could not load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    base = tmp_path / "base"
    tiny_llama(seed=3).save_pretrained(base)
    assert (base / "generation_config.json").is_file()
    common = [str(base), "--weights", str(base), "--tokenizer", str(files["tok"]),
              "--data", str(files["train"]), "--seq-len", "32", "--global-batch", "2",
              "--lr", "1e-2"]
    adapter, full = tmp_path / "adapter", tmp_path / "full"
    rc, _ = _cli([*common, "--steps", "4", "--lora-rank", "4", "--save", str(adapter),
                  "--check"], capsys)
    out = capsys.readouterr().out if rc else ""
    assert rc == 0, out
    tok_files = {f.name for f in tokenizer_files(files["tok"])}
    assert tok_files and tok_files <= {f.name for f in adapter.iterdir()}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert any(".lora_B" in n and p.abs().sum() > 0 for n, p in peft.named_parameters())
    rc, _ = _cli([*common, "--steps", "2", "--save", str(full)], capsys)
    assert rc == 0
    assert {"generation_config.json", *tok_files} <= {f.name for f in full.iterdir()}
    text = pipeline("text-generation", model=str(full))("the cat", max_new_tokens=3)
    assert text[0]["generated_text"].startswith("the cat")


def test_lora_check_with_weights_equals_peft(group, files, tmp_path: Path, capsys) -> None:
    """--check's one process starts from --weights and peft's LoRA from our init."""
    from collie_compile.cli import main

    base = tmp_path / "base"
    tiny_llama(seed=4).save_pretrained(base)
    rc = main(["train", str(base), "--weights", str(base), "--data", str(files["train"]),
               "--tokenizer", str(files["tok"]), "--steps", "4", "--seq-len", "32",
               "--global-batch", "2", "--lr", "1e-2", "--lora-rank", "4", "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    check = next(ln for ln in out.splitlines() if ln.startswith("one process"))
    assert float(check.split("parallel run ")[1].split()[0]) < 1e-5, check
    assert "LoRA on randomly initialised weights" not in out


def test_separate_documents_train_as_one_process_of_transformers_does(
        group, files, capsys) -> None:
    """`train --separate-documents`: rows carry position_ids restarting per document, and
    --check's one process (transformers without a KV cache, given the same rows) agrees,
    micro-batched; the documents did not attend to each other: other losses than without
    the flag."""
    from collie_compile.cli import main

    common = ["train", str(files["model"]), "--data", str(files["train"]), "--tokenizer",
              str(files["tok"]), "--steps", "3", "--seq-len", "32", "--global-batch", "4",
              "--micro-batch-size", "2", "--lr", "1e-2"]
    losses = []
    for extra in (["--separate-documents", "--check"], []):
        assert main([*common, *extra]) == 0
        out = capsys.readouterr().out
        losses.append([float(ln.split("loss ")[1].split()[0]) for ln in out.splitlines()
                       if ln.startswith("step ")])
        if extra:
            check = next(ln for ln in out.splitlines() if ln.startswith("one process"))
            assert float(check.split("parallel run ")[1].split()[0]) < 1e-5, check
    assert len(losses[0]) == 3 and min(abs(a - b) for a, b in zip(*losses)) > 1e-4, losses


def test_check_that_disagrees_fails_the_run(group, files, monkeypatch, capsys) -> None:
    """--check reported a 0.85 difference and exited 0. (A tolerance below any difference
    stands in for a parallel run that disagrees.)"""
    import collie_compile.training.run as run
    from collie_compile.cli import main

    monkeypatch.setattr(run, "CHECK_TOLERANCE", -1.0)
    rc = main(["train", str(files["model"]), "--data", str(files["train"]), "--tokenizer",
               str(files["tok"]), "--steps", "2", "--seq-len", str(SEQ), "--global-batch",
               "2", "--check"])
    said = capsys.readouterr()
    assert rc == 2 and "one process, same model and batches" in said.out
    assert "--check: the parallel run's losses differ from one process's by" in said.err


def test_lora_on_a_random_base_says_so(group, files, tmp_path: Path, capsys) -> None:
    from collie_compile.cli import main

    rc = main(["train", str(files["model"]), "--data", str(files["train"]), "--tokenizer",
               str(files["tok"]), "--steps", "1", "--seq-len", str(SEQ), "--global-batch",
               "2", "--lora-rank", "4"])
    assert rc == 0
    assert "note: adapters on randomly initialised weights (no --weights)" in \
        capsys.readouterr().out


def test_peft_config_files_train_like_peft_and_continue(group, files, tmp_path: Path,
                                                        capsys) -> None:
    """`train --peft CONFIG.json`: DoRA, IA3 (peft's defaults for Llama), prompt and prefix
    tuning and AdaLoRA (its ranks allocated) train as peft trains them in one process (--check),
    save adapters peft loads, and
    `--peft-adapter DIR` continues one; --merge folds IA3 into plain weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from collie_compile.cli import main

    base = tmp_path / "base"
    tiny_llama(seed=5).save_pretrained(base)
    common = ["train", str(base), "--weights", str(base), "--data", str(files["train"]),
              "--tokenizer", str(files["tok"]), "--seq-len", "32", "--global-batch", "2",
              "--lr", "1e-2"]
    configs = {"dora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                        "target_modules": ["q_proj", "o_proj", "down_proj"]},
               "ia3": {"peft_type": "IA3"},
               "prompt": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                          "num_virtual_tokens": 4},
               "prefix": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                          "num_virtual_tokens": 4},
               # total_step from --steps: a budget cut at step 1, the final one at 2
               "adalora": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tfinal": 1,
                           "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    for name, fields in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(fields))
        rc = main([*common, "--steps", "3", "--peft", str(tmp_path / f"{name}.json"),
                   "--save", str(tmp_path / name), "--check"])
        said = capsys.readouterr()
        out = said.out
        assert rc == 0, said.err
        check = next(ln for ln in out.splitlines() if ln.startswith("one process"))
        assert float(check.split("parallel run ")[1].split()[0]) < 1e-5, check
        assert "saved a PEFT adapter" in out
    ada = json.loads((tmp_path / "adalora" / "adapter_config.json").read_text())
    assert ada["total_step"] == 3 and sum(map(sum, ada["rank_pattern"].values())) == 2 * 6
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     tmp_path / "ia3")
    scales = [p for n, p in peft.named_parameters() if "ia3_l" in n]
    assert len(scales) == 3 * 2 and any((p - 1).abs().max() > 1e-4 for p in scales)
    rc = main([*common, "--steps", "2", "--peft-adapter", str(tmp_path / "ia3"), "--save",
               str(tmp_path / "merged"), "--merge"])
    assert rc == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    start = AutoModelForCausalLM.from_pretrained(base).state_dict()
    moved = [k for k in start if not torch.equal(start[k], merged[k])]
    assert moved and all(k.endswith(("k_proj.weight", "v_proj.weight", "down_proj.weight"))
                         for k in moved)


def test_parallelize_defaults_to_a_fine_tuning_batch(group) -> None:
    """Without global_batch_size it planned 131,072 sequences a step (the planner's ~2M
    tokens) and then demanded input of that shape."""
    from collie_compile import parallelize

    pm = parallelize(tiny_llama(), gpus=1, seq_len=16)
    assert pm.plan.global_batch_size == 8
    pm.train_step({"input_ids": torch.randint(0, 64, (8, 16))})


def test_a_resume_into_another_run_is_refused_or_said(group, files, tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    """The resume matrix (docs/training.md): each field that defines a run changed on
    resume. It used to resume silently (model by path string, data by row count, seed,
    seq-len, dtype crashed with KeyError 'step_t', --steps below the checkpoint, a cosine
    run extended with its rate jumping 15x)."""
    import json as _json

    from transformers import LlamaConfig

    monkeypatch.chdir(tmp_path)
    tiny_llama().config.save_pretrained(tmp_path / "m")
    data = tmp_path / "chat.jsonl"
    shutil.copy(files["train"], data)
    base = ["train", "m", "--data", "chat.jsonl", "--tokenizer", str(files["tok"]),
            "--seq-len", "32", "--global-batch", "4", "--save-every", "1",
            "--no-tensorboard", "--lr", "1e-3"]
    first = tmp_path / "first"
    assert main_ok([*base, "--steps", "2", "--output", str(first)], capsys)

    def resume(extra: list[str], prepare: object = None) -> tuple[int, str, str]:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        shutil.copytree(first, out)
        if prepare:
            prepare()
        from collie_compile.cli import main

        rc = main([*base, "--output", str(out), *extra])
        said = capsys.readouterr()
        return rc, said.out, said.err

    def other_rope() -> None:
        cfg = LlamaConfig.from_pretrained(tmp_path / "m")
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": 500000.0}
        cfg.save_pretrained(tmp_path / "m2")

    def other_tokenizer() -> None:
        shutil.copytree(files["tok"], tmp_path / "tok2", dirs_exist_ok=True)
        spec = _json.loads((tmp_path / "tok2" / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
        (tmp_path / "tok2" / "tokenizer.json").write_text(_json.dumps(spec))

    lines = [_json.loads(ln) for ln in data.read_text().splitlines()]
    refused = {
        "seed": (["--steps", "3", "--seed", "1"], None, "its seed is 0, this run's 1"),
        "seq-len": (["--steps", "3", "--seq-len", "64"], None,
                    "its sequences are 32 tokens, this run's 64"),
        "data order": (["--steps", "3"], lambda: data.write_text("".join(
            _json.dumps(r) + "\n" for r in lines[::-1])), "its training data held other "
                                                          "tokens"),
        "steps below": (["--steps", "1"], None, "it is at step 2, past this run's --steps 1"),
        "schedule": (["--steps", "4", "--lr-schedule", "cosine"], None,
                     "its learning rate at step 2 was"),
        "dtype": (["--steps", "3", "--dtype", "bf16"], None,
                  "saved with fp32 weights and this run's are bf16"),
        "optimizer": (["--steps", "3", "--optimizer", "lion"], None,
                      "holds the states of the adamw optimizer"),
        # the same words at other ids: the tokenizer's files, so the token stream, differ
        "tokenizer": (["--steps", "3", "--tokenizer", str(tmp_path / "tok2")],
                      lambda: other_tokenizer(), "its training data held other tokens"),
    }
    for name, (extra, prepare, says) in refused.items():
        rc, out, err = resume(extra, prepare)
        data.write_text("".join(_json.dumps(r) + "\n" for r in lines))
        err_lines = err.strip().splitlines()
        assert rc == 2 and len(err_lines) == 1 and says in err_lines[0], (name, err)
    rc, _, err = resume(["--steps", "3", "--separate-documents"])
    assert rc == 2 and ("its documents attended to those before them in a row, this run's "
                        "are kept apart (--separate-documents)") in err, err
    # a model of the same name in another folder with another rope_theta
    other_rope()
    base_m = base[1]
    base[1] = "m2"
    rc, _, err = resume(["--steps", "3"])
    assert rc == 2 and "holds another model than this one (rope_parameters" in err, err
    base[1] = str(tmp_path / "m")  # the same folder by absolute path: the same model
    rc, out, err = resume(["--steps", "3"])
    assert rc == 0 and "resuming from" in out, err
    base[1] = base_m
    # handled and said: another global batch; the constant schedule extended (the same
    # rates for the steps done)
    rc, out, _ = resume(["--steps", "3", "--global-batch", "2"])
    assert rc == 0 and "note: the global batch was 4 sequences and is 2 from step 3" in out
    assert "the same rates for its 2 steps" in out


def test_outputs_are_checked_before_training_and_never_truncated(group, files,
                                                                 tmp_path: Path,
                                                                 capsys) -> None:
    """An unusable --save was found after all steps (a traceback, the weights lost); a
    rerun on an --output without checkpoints truncated the earlier run's metrics."""
    from collie_compile.cli import main

    base = ["train", str(files["model"]), "--data", str(files["train"]), "--tokenizer",
            str(files["tok"]), "--seq-len", str(SEQ), "--global-batch", "2", "--steps", "2",
            "--no-tensorboard"]
    note = tmp_path / "note.txt"
    note.write_text("x")
    for save, says in ((note / "out", f"{note} is a file"),
                       (Path("/proc/sys/collie-out"), "/proc/sys is not writable")):
        assert main([*base, "--save", str(save)]) == 2
        err = capsys.readouterr()
        assert says in err.err and "step" not in err.out, err
    out = tmp_path / "run"
    assert main([*base, "--output", str(out)]) == 0
    kept = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*base, "--output", str(out)]) == 2
    assert "holds the metrics of an earlier run but no checkpoint" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == kept


def test_an_unwritable_cache_is_one_line_naming_the_variable(group, files, monkeypatch,
                                                              capsys) -> None:
    from collie_compile.cli import main

    monkeypatch.setenv("COLLIE_COMPILE_CACHE", "/proc/sys/collie-cache")
    rc = main(["train", str(files["model"]), "--data", str(files["train"]), "--tokenizer",
               str(files["tok"]), "--seq-len", str(SEQ), "--global-batch", "2", "--steps", "1",
               "--seed", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "set COLLIE_COMPILE_CACHE to a writable" in err[0], err


def test_batches_with_no_counted_token_are_skipped(group, files, tmp_path: Path,
                                                   capsys) -> None:
    """Long prompts: 7 of 10 steps logged "loss 0.0000", applied weight decay and moved
    the schedule."""
    from training_data import WORDS

    from collie_compile import parallelize
    from collie_compile.cli import main

    pm = parallelize(tiny_llama(), gpus=1, seq_len=SEQ, global_batch_size=2, lr=1e-2)
    x = torch.randint(0, 64, (2, SEQ))
    before = pm.full_state_dict()
    assert pm.train_step({"input_ids": x, "labels": torch.full_like(x, IGNORE_INDEX)}) is None
    assert pm.step_count == 0
    assert all(torch.equal(v, pm.full_state_dict()[k]) for k, v in before.items())
    rng = __import__("random").Random(0)
    data = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(60)),
         "completion": " ".join(rng.choice(WORDS) for _ in range(3))} for _ in range(8)])
    out = tmp_path / "run"
    assert main(["train", str(files["model"]), "--data", str(data), "--tokenizer",
                 str(files["tok"]), "--seq-len", str(SEQ), "--global-batch", "2",
                 "--steps", "4", "--output", str(out), "--no-tensorboard", "--check"]) == 0
    said = capsys.readouterr().out
    records = metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and min(losses) > 0.5, losses
    skipped = next(r["batches_skipped"] for r in records if "batches_skipped" in r)
    assert skipped > 0 and f"note: {skipped} batches held no token that counts" in said
    check = next(ln for ln in said.splitlines() if ln.startswith("one process"))
    assert float(check.split("parallel run ")[1].split()[0]) < 1e-5, check


def main_ok(args: list[str], capsys) -> bool:
    from collie_compile.cli import main

    rc = main(args)
    said = capsys.readouterr()
    assert rc == 0, said.err
    return True


# -- 4 gloo ranks: kill, resume, compare ------------------------------------------------

FLAGS = ["--eval-every", "2", "--save-every", "2", "--keep-last", "2", "--steps", "6",
         "--lr-schedule", "cosine", "--warmup-steps", "2", "--lr", "1e-2", "--seq-len", "32",
         "--global-batch", "4", "--no-tensorboard"]
LAYOUT = ["--dp", "2", "--tp", "2"]


def launch(files: dict, output: Path, env: dict | None = None, port: int = 29641,
           extra: tuple[str, ...] = (), nproc: int = 4, log: Path | None = None
           ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(port), "-m", "collie_compile", "train", str(files["model"]),
           "--data", str(files["train"]), "--tokenizer", str(files["tok"]), "--eval-data",
           str(files["eval"]), "--output", str(output), *FLAGS,
           *(LAYOUT if nproc == 4 else []), *extra]
    out = open(log or output.with_suffix(".log"), "a")  # noqa: SIM115 - the child writes it
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def train_losses(folder: Path) -> dict[int, float]:
    records = [r for r in metrics(folder) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps  # each step once
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_losses(files, tmp_path: Path) -> None:
    """`collie-compile train` on 4 gloo ranks (dp2·tp2), chat data, cosine with warm-up,
    eval and checkpoints every 2 steps: SIGKILLed after step 3, then killed again halfway
    through writing step 4's checkpoint, then run to the end: every step's loss and eval
    equals the uninterrupted run's exactly. The uninterrupted run's --check trains one
    process on the same batches at the same rates: its losses agree too."""
    ref = tmp_path / "ref"
    assert launch(files, ref, extra=("--check",)).wait(timeout=600) == 0, \
        ref.with_suffix(".log").read_text()
    check = [ln for ln in ref.with_suffix(".log").read_text().splitlines()
             if ln.startswith("one process")][-1]
    assert float(check.split("parallel run ")[1].split()[0]) < 1e-5, check

    run = tmp_path / "run"
    job = launch(files, run, port=29642)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        if (run / "metrics.jsonl").exists() and any(
                r.get("step", 0) >= 3 and "loss" in r for r in _records(run)):
            break
        time.sleep(0.05)
    kill_job(job)
    assert max(train_losses(run)) < 6  # killed mid-run
    assert (run / "checkpoints" / "step-00000002").is_dir()

    job = launch(files, run, env={"COLLIE_COMPILE_KILL_AT": "save:4"}, port=29643)
    assert job.wait(timeout=600) != 0
    assert (run / "checkpoints" / "step-00000004.tmp").is_dir()  # half-written, left behind
    assert not (run / "checkpoints" / "step-00000004").exists()

    assert launch(files, run, port=29644).wait(timeout=600) == 0, \
        run.with_suffix(".log").read_text()
    log = run.with_suffix(".log").read_text()
    assert "resuming from" in log and "step-00000004.tmp, a checkpoint a stopped run" in log

    expected, got = train_losses(ref), train_losses(run)
    assert sorted(got) == list(range(1, 7)) and got == expected  # exactly
    evals = lambda f: {r["step"]: r["eval_loss"] for r in metrics(f) if "eval_loss" in r}  # noqa: E731
    assert evals(run) == evals(ref) and sorted(evals(ref)) == [2, 4, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000006"]  # --keep-last 2, nothing partial
    lrs = [r["lr"] for r in metrics(ref) if "loss" in r]
    assert lrs == pytest.approx([LRSchedule(1e-2, 6, "cosine", 2).at(i) for i in range(6)])

    # each data-parallel replica read its half of every step's rows, no more
    data = packed(files["train"], files["tok"], seq=32)
    summary = [r for r in metrics(ref) if "data_tokens_read_per_rank" in r][-1]
    counts = [0, 0]
    for s in range(6):
        for r in range(2):
            before = data.tokens_read
            data.batch(4 * s, 4, rows=slice(2 * r, 2 * r + 2))
            counts[r] += data.tokens_read - before
    # ranks are tp-innermost: 0,1 are replica 0; 2,3 replica 1
    assert summary["data_tokens_read_per_rank"] == [counts[0]] * 2 + [counts[1]] * 2
    assert sum(counts) == data.tokens_read and abs(counts[0] - counts[1]) < 64

    # another GPU count: step 4's checkpoint resumed by one process goes on alike
    moved = tmp_path / "moved"
    shutil.copytree(ref / "checkpoints" / "step-00000004", moved / "checkpoints" / "step-4")
    from collie_compile.cli import main

    ours = not dist.is_initialized()  # the module's group of one, when it ran first
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
    try:
        assert main(["train", str(files["model"]), "--data", str(files["train"]),
                     "--tokenizer", str(files["tok"]), "--eval-data", str(files["eval"]),
                     "--output", str(moved), *FLAGS]) == 0
    finally:
        if ours:
            dist.destroy_process_group()
    alone = train_losses(moved)
    assert sorted(alone) == [5, 6]
    assert [alone[s] for s in (5, 6)] == pytest.approx([expected[5], expected[6]], rel=1e-5)

    # every final weight, per tensor: the resumed run's equal the uninterrupted run's, and
    # the one-process continuation's agree to rounding
    from safetensors.torch import load_file

    want = load_file(ref / "final" / "model.safetensors")
    got = load_file(run / "final" / "model.safetensors")
    moved_w = load_file(moved / "final" / "model.safetensors")
    assert sorted(got) == sorted(want) == sorted(moved_w)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for k in want:
        assert float((moved_w[k] - want[k]).norm()) <= 1e-5 * float(want[k].norm()), k

    # the final folder is the trained model, and its eval loss is the logged one
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    held = packed(files["eval"], files["tok"], seq=32)
    rows = held.rows(list(range(held.num_sequences)))
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"]).logits[:, :-1]
    labels = rows["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    assert float(loss) == pytest.approx(evals(run)[6], rel=1e-5)


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the whole job at once, as a scheduler does: torchrun's agent and its
    workers (which run in sessions of their own, out of reach of a killpg)."""
    pids, frontier = [job.pid], [job.pid]
    while frontier:
        parent, frontier = frontier, []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parent:
                frontier.append(int(stat.parent.name))
        pids += frontier
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def _workers_of(output: Path) -> list[int]:
    """Pids of processes training into ``output`` (its path in their command line)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(output).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_one_job_per_output_and_none_outlives_its_launcher(files, tmp_path: Path) -> None:
    """Two jobs on one --output both trained (metrics with steps logged twice); killing
    torchrun left its workers training."""
    run = tmp_path / "run"
    steps = ["--steps", "100000", "--save-every", "50000", "--eval-every", "50000"]
    first = launch(files, run, port=29645, extra=tuple(steps), nproc=2)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        assert first.poll() is None, run.with_suffix(".log").read_text()
        time.sleep(0.1)
    second_log = tmp_path / "second.log"
    start = time.time()
    second = launch(files, run, port=29646, extra=tuple(steps), nproc=2, log=second_log)
    assert second.wait(timeout=120) != 0
    refused = [ln for ln in second_log.read_text().splitlines()
               if "collie-compile: error:" in ln]
    assert refused and f"--output {run} is in use by another job (pid" in refused[0], \
        second_log.read_text()[-2000:]
    assert time.time() - start < 60 and first.poll() is None  # the first trains on
    os.kill(first.pid, signal.SIGKILL)  # the launcher alone, as a lost terminal does
    first.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _workers_of(run):
        time.sleep(0.2)
    assert not _workers_of(run), "workers outlived their launcher"


def _records(folder: Path) -> list[dict]:
    out = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
