"""Saves never delete or overwrite a file they did not write, and a damaged save is
refused by name (issue 31, items 1-3). Models built as users build them: transformers'
LlamaConfig, ``from_config``, a ``save_pretrained`` folder with a README beside it.
(Under ZeRO-3 and pp2: tests/dist_worker.py's ``save_folders`` configuration.)"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from collie_compile.errors import CollieError
from collie_compile.runtime import folders

SEQ, BATCH = 16, 2


def llama(vocab: int = 128, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg)


def parallel(model: torch.nn.Module | None = None, **kw: object) -> object:
    from collie_compile import parallelize

    kw = {"optimizer": "adamw", **kw}
    return parallelize(model or llama(), gpus=1, seq_len=SEQ, global_batch_size=BATCH,
                       lr=1e-3, dp=1, tp=1, pp=1, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def batch(vocab: int = 128, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face model folder as users have them: weights, config, generation
    config, a model card."""
    d = tmp_path_factory.mktemp("base") / "llama"
    llama().save_pretrained(d)
    (d / "README.md").write_text("# my model\n")
    return d


def test_a_save_never_replaces_a_save_of_another_kind(group, tmp_path: Path) -> None:
    pm = parallel()
    pm.train_step(batch())
    hf, ck = tmp_path / "hf", tmp_path / "ck"
    pm.save_pretrained(hf)
    pm.save_checkpoint(ck)
    kept_hf, kept_ck = snapshot(hf), snapshot(ck)
    with pytest.raises(CollieError, match="holds a collie-compile pretrained save, and this is "
                                          "a checkpoint save"):
        pm.save_checkpoint(hf)
    with pytest.raises(CollieError, match="holds a collie-compile checkpoint save, and this is "
                                          "a pretrained save"):
        pm.save_pretrained(ck)
    assert snapshot(hf) == kept_hf and snapshot(ck) == kept_ck
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]  # no .tmp left
    # the same kind replaces its own files, and what transformers reads is as before
    pm.train_step(batch(seed=1))
    pm.save_pretrained(hf)
    assert snapshot(hf).keys() == kept_hf.keys() and snapshot(hf) != kept_hf
    loaded = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in pm.full_state_dict().items())
    (hf / "notes.txt").write_text("mine")
    with pytest.raises(CollieError, match=r"holds files the save there did not write "
                                          r"\(notes.txt\)"):
        pm.save_pretrained(hf)
    assert (hf / "notes.txt").read_text() == "mine"


def test_the_base_model_folder_is_never_a_save_target(group, base: Path, tmp_path: Path,
                                                      capsys) -> None:
    """`train --weights DIR --save DIR` used to overwrite the base model and delete its
    README.md and generation_config.json."""
    from collie_compile.cli import main

    kept = snapshot(base)
    pm = parallel(AutoModelForCausalLM.from_pretrained(base))
    with pytest.raises(CollieError, match="holds files no collie-compile save wrote"):
        pm.save_pretrained(base)
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 40)
    capsys.readouterr()  # transformers' loading bar above
    other = tmp_path / "other"  # another HF folder, not one this run reads
    shutil.copytree(base, other)
    for target, says in ((base, f"--save {base} overlaps --weights {base}"),
                         (base / "sub", f"--save {base / 'sub'} overlaps --weights"),
                         (data, f"--save {data} overlaps --data {data}"),
                         (other, f"cannot save to {other}: {other} holds files no")):
        rc = main(["train", str(base), "--weights", str(base), "--data", str(data),
                   "--steps", "1", "--seq-len", str(SEQ), "--global-batch", str(BATCH),
                   "--save", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and says in err[0], err
    assert snapshot(base) == kept and snapshot(other) == kept and data.exists()


def test_a_killed_saves_leftovers_go_a_users_stay(group, tmp_path: Path) -> None:
    pm = parallel()
    out = tmp_path / "ck"
    left = folders.begin(out, "checkpoint")  # as a save killed halfway leaves it
    (left / "rank00000.safetensors").write_bytes(b"half")
    pm.save_checkpoint(out)
    assert not left.exists() and folders.verify(out)
    users = tmp_path / "run.tmp"  # a folder of the user's that only looks like ours
    users.mkdir()
    (users / "keep.py").write_text("")
    with pytest.raises(CollieError, match=r"run.tmp holds files no collie-compile save wrote "
                                          r"\(keep.py\)"):
        pm.save_checkpoint(tmp_path / "run")
    assert (users / "keep.py").exists() and not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CollieError, match="exists and is not a folder"):
        pm.save_pretrained(tmp_path / "file")


def test_a_save_stopped_between_its_renames_is_found(group, tmp_path: Path) -> None:
    pm = parallel()
    ck = tmp_path / "ck"
    pm.save_checkpoint(ck)
    ck.rename(tmp_path / "ck.old")  # killed after moving the old one aside
    with pytest.raises(CollieError, match=r"ck.old holds the save before it: a save was "
                                          r"stopped between its two renames. Rename"):
        pm.load_checkpoint(ck)


def _damage(folder: Path, how: str, rng: random.Random) -> None:
    rank = folder / "rank00000.safetensors"
    size = rank.stat().st_size
    if how == "0xff in the middle":
        with open(rank, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff" * min(4096, size // 4))
    elif how == "one bit":
        data = bytearray(rank.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        rank.write_bytes(bytes(data))
    elif how == "truncated":
        os.truncate(rank, rng.randrange(size))
    elif how == "rank file deleted":
        rank.unlink()
    elif how == "index edited":
        index = json.loads((folder / "index.json").read_text())
        index["step"] += 1
        (folder / "index.json").write_text(json.dumps(index))
    elif how == "manifest cut":
        m = folder / folders.MANIFEST
        m.write_text(m.read_text()[:20])
    elif how == "manifest gone, index cut":  # an old-format checkpoint, damaged
        (folder / folders.MANIFEST).unlink()
        (folder / "index.json").write_text("{")


@pytest.mark.parametrize("how", ["0xff in the middle", "one bit", "truncated",
                                 "rank file deleted", "index edited", "manifest cut",
                                 "manifest gone, index cut"])
def test_a_damaged_checkpoint_is_refused_in_one_line(group, tmp_path: Path, how: str) -> None:
    """4 KiB of 0xff in a rank file used to load, and the next loss was NaN."""
    pm = parallel()
    pm.train_step(batch())
    ck = tmp_path / "ck"
    pm.save_checkpoint(ck)
    before = pm.full_state_dict()
    for seed in range(3):
        shutil.rmtree(ck)
        pm.save_checkpoint(ck)
        _damage(ck, how, random.Random(seed))
        with pytest.raises(CollieError) as e:
            pm.load_checkpoint(ck)
        assert "\n" not in str(e.value) and str(ck) in str(e.value), str(e.value)
        if how.startswith(("0xff", "one bit", "truncated")):
            assert "rank00000.safetensors does not match the checksum" in str(e.value)
    after = pm.full_state_dict()  # refused before anything was read into the model
    assert all(torch.equal(before[k], after[k]) for k in before)
    shutil.rmtree(ck)
    pm.save_checkpoint(ck)
    pm.load_checkpoint(ck)  # and an undamaged one loads
    assert torch.isfinite(torch.tensor(pm.train_step(batch(seed=2))))


def test_a_damaged_plan_file_is_refused_in_one_line(tmp_path: Path) -> None:
    from collie_compile.planner.result import Plan
    from collie_compile.planner.search import plan

    text = plan("tiny-llama", gpus=2, seq_len=16, global_batch_size=4).to_json()
    rng = random.Random(0)
    path = tmp_path / "plan.json"
    for _ in range(40):
        data = bytearray(text.encode())
        at = rng.randrange(len(data))
        kind = rng.choice(["flip", "cut", "drop"])
        if kind == "flip":
            data[at] = rng.choice(b"0123456789\"{}[],:xyz ")
        elif kind == "cut":
            data = data[:at]
        else:
            del data[at]
        if bytes(data) == text.encode():
            continue
        path.write_bytes(bytes(data))
        try:
            loaded = Plan.load(path)
        except CollieError as e:
            assert "\n" not in str(e), str(e)
            continue
        # an edit that leaves the same plan (whitespace, a digit of a prose note)
        assert loaded.chosen == Plan.from_json(text).chosen, bytes(data)


def test_a_checkpoint_resumes_only_under_its_optimizer(group, tmp_path: Path) -> None:
    """Lion -> AdamW died with a raw KeyError: 'exp_avg_sq'; AdamW -> Adan, Lion, SGD,
    LOMO and LOMO -> AdamW loaded, reusing another rule's states."""
    saved = {}
    for rule in ("lion", "adamw", "lomo"):
        pm = parallel(optimizer=rule)
        pm.train_step(batch())
        pm.save_checkpoint(tmp_path / rule)
        saved[rule] = pm.full_state_dict()
    for was, now in (("lion", "adamw"), ("adamw", "adan"), ("adamw", "lion"),
                     ("adamw", "sgd"), ("adamw", "lomo"), ("lomo", "adamw")):
        pm = parallel(optimizer=now)
        with pytest.raises(CollieError, match=f"holds the states of the {was} optimizer, and "
                                              f"this run uses {now}; resume with {was}"):
            pm.load_checkpoint(tmp_path / was)
        pm.load_checkpoint(tmp_path / was, fresh_optimizer=True)  # weights only, as asked
        assert all(torch.equal(v, pm.full_state_dict()[k]) for k, v in saved[was].items())
        assert pm.step_count == 1 and torch.isfinite(torch.tensor(pm.train_step(batch(1))))
    pm = parallel(optimizer="adamw", optimizer_kwargs={"betas": (0.8, 0.9)})
    with pytest.warns(UserWarning, match=r"adamw's betas was \[0.9, 0.999\], now \[0.8, 0.9\]"):
        pm.load_checkpoint(tmp_path / "adamw")


def test_train_output_keeps_folders_it_did_not_write(group, tmp_path: Path, capsys) -> None:
    """Anything named step-* that was not step-<digits> used to be deleted at start as
    "a checkpoint a stopped run did not finish"; a resume under another --optimizer
    died with a KeyError."""
    from collie_compile.cli import main

    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 40)
    out = tmp_path / "run"
    args = ["train", "tiny-llama", "--data", str(data), "--seq-len", str(SEQ),
            "--global-batch", str(BATCH), "--output", str(out), "--save-every", "1",
            "--no-tensorboard", "--lr", "1e-3"]
    assert main([*args, "--steps", "2", "--optimizer", "lion"]) == 0
    root = out / "checkpoints"
    kept = [root / "step-best", root / "step-00000001-good", root / "step-00000009.tmp"]
    for d in kept:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
    left = folders.begin(root / "step-00000007", "checkpoint")  # a killed save of ours
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--optimizer", "adamw"]) == 2
    said = capsys.readouterr()
    assert "holds the states of the lion optimizer, and this run uses adamw" in said.err
    assert f"removed {left}" in said.out and not left.exists()
    assert main([*args, "--steps", "3", "--optimizer", "adamw", "--fresh-optimizer"]) == 0
    assert "the optimizer starts afresh (--fresh-optimizer)" in capsys.readouterr().out
    assert all((d / "notes.txt").read_text() == "mine" for d in kept)


def test_a_plan_is_bound_to_its_model_not_its_path(group, tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    """`plan m --out p.json` in one folder, then `train m --plan p.json` in another whose
    m is a 20x larger model trained without complaint; the same folder by absolute path
    was refused."""
    from transformers import LlamaConfig

    from collie_compile.cli import main

    small, big = tmp_path / "a" / "m", tmp_path / "b" / "m"
    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(small)
    LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(big)
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 40)
    plan_file = tmp_path / "p.json"
    monkeypatch.chdir(small.parent)
    assert main(["plan", "m", "--gpus", "1", "--seq-len", str(SEQ), "--global-batch",
                 str(BATCH), "--out", str(plan_file)]) == 0
    run = ["--plan", str(plan_file), "--data", str(data), "--steps", "1"]
    monkeypatch.chdir(big.parent)
    capsys.readouterr()
    assert main(["train", "m", *run]) == 2
    err = capsys.readouterr().err
    assert "the plan is for 'm' of 26,784 parameters, but this model ('m') has 771,200" in err, err
    assert main(["train", str(small), *run]) == 0  # the planned model, by another path
