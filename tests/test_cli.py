import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from collie_compile.cli import main
from collie_compile.cost.hardware import CATALOG
from collie_compile.planner.search import plan


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_estimate_json_keys_exact(capsys):
    rc, out, _ = run(capsys, "estimate", "tiny-llama", "--gpus", "4", "--tp", "2",
                     "--seq-len", "64", "--optimizer", "lion", "--dtype", "fp32", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert set(doc) == {"model", "num_params", "trainable_params", "active_params", "gpu",
                        "gpu_memory_bytes", "usable_memory_bytes", "layout", "optimizer",
                        "dtype", "per_gpu", "fits", "update_in_backward"}
    assert doc["active_params"] == doc["num_params"]  # dense: every parameter a token
    assert doc["update_in_backward"] is False
    assert doc["layout"] == {"dp": 2, "tp": 2, "pp": 1, "ep": 1, "zero": 0, "micro_batch_size": 1,
                             "num_microbatches": 1, "schedule": "1f1b", "virtual_stages": 1,
                             "seq_len": 64,
                             "recompute": "none"}
    assert set(doc["per_gpu"]) == {"params_bytes", "grads_bytes", "optimizer_bytes",
                                   "activations_bytes", "other_bytes", "total_bytes"}
    assert doc["per_gpu"]["total_bytes"] == sum(
        v for k, v in doc["per_gpu"].items() if k != "total_bytes")
    assert doc["num_params"] == 123712 and doc["fits"] is True


def test_unknown_model_type_is_one_short_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "foobar"}))
    rc, _, err = run(capsys, "estimate", str(tmp_path))
    assert rc == 2 and "does not know model_type 'foobar'" in err and len(err) < 300


def test_names_are_case_insensitive(capsys):
    rc, out, _ = run(capsys, "estimate", "tiny-llama", "--seq-len", "32", "--dtype", "BF16",
                     "--optimizer", "AdamW", "--gpu", "H100-80GB", "--json")
    doc = json.loads(out)
    assert rc == 0 and (doc["dtype"], doc["optimizer"], doc["gpu"]) == ("bf16", "adamw",
                                                                       "h100-80gb")


def test_estimate_table(capsys):
    rc, out, _ = run(capsys, "estimate", "tiny-gpt2", "--seq-len", "32", "--gpu", "rtx4090")
    assert rc == 0
    assert "optimizer states" in out and "fits" in out and "rtx4090" in out


def test_models_and_gpus_lists(capsys):
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "llama-2-70b" in out and "68,976,648,192" in out
    rc, out, _ = run(capsys, "gpus", "--json")
    assert rc == 0 and {g["name"] for g in json.loads(out)} == set(CATALOG)


def test_a_gpu_spec_from_gpus_is_what_gpu_takes(capsys, tmp_path: Path):
    """`gpus --json` wrote a list that --gpu rejected; a small spec read "needs 0.00 GiB
    ... 0.00 GiB usable"."""
    listed = tmp_path / "all.json"
    listed.write_text(run(capsys, "gpus", "--json")[1])
    rc, _, err = run(capsys, "estimate", "tiny-llama", "--gpu", str(listed))
    assert rc == 2 and "holds a list of GPU specs; --gpu takes one object" in err
    rc, out, _ = run(capsys, "gpus", "rtx4090")
    spec = json.loads(out)
    assert rc == 0 and spec["name"] == "rtx4090"
    spec.update(name="tiny-card", memory_bytes=64 * 2**20)
    small = tmp_path / "tiny.json"
    small.write_text(json.dumps(spec))
    rc, out, _ = run(capsys, "estimate", "tiny-llama", "--gpu", str(small), "--seq-len", "16")
    assert rc == 0 and "60.80 MiB usable with 5% kept free" in out, out


@pytest.mark.parametrize("argv,match", [
    (["estimate", "llama-9000"], "unknown model 'llama-9000'"),
    (["estimate", "tiny-llama", "--gpu", "b300"], "unknown GPU 'b300'"),
    (["estimate", "tiny-llama", "--optimizer", "adafactorx"], "unknown optimizer"),
    (["estimate", "tiny-llama", "--gpus", "6", "--tp", "4"], "not divisible by tp*pp=4"),
    (["estimate", "tiny-llama", "--gpus", "8", "--dp", "2", "--tp", "2"], "= 4 but gpus=8"),
    (["estimate", "tiny-llama", "--tp", "3"], "does not divide tiny-llama's 4 attention"),
    (["estimate", "tiny-llama", "--pp", "3"], "pp=3 needs 3 layers, tiny-llama has 2"),
    (["estimate", "tiny-llama", "--seq-len", "100000"], "exceeds tiny-llama's maximum"),
    (["estimate", "tiny-llama", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    # zero is not "unset": it used to fall back to the default silently
    (["estimate", "tiny-llama", "--seq-len", "0"], "seq_len (--seq-len) must be a positive"),
    (["estimate", "tiny-llama", "--num-microbatches", "0"], "(--num-microbatches) must be"),
    (["plan", "tiny-llama", "--gpus", "4", "--seq-len", "0"], "seq_len (--seq-len) must be"),
    (["plan", "tiny-llama", "--gpus", "4", "--top", "-1"], "must be 0 or more"),
    (["plan", "tiny-llama", "--gpus", "4", "--gpus-per-node", "0"], "(--gpus-per-node) must"),
    # a bad --out fails before the solve, not with a traceback after it
    (["plan", "tiny-llama", "--gpus", "4", "--out", "/nonexistent-dir/p.json"],
     "folder /nonexistent-dir does not exist"),
    (["plan", "tiny-llama", "--gpus", "4", "--out", "/tmp"], "is a directory"),
    (["plan", "tiny-llama", "--gpus", "4", "--pp", "3"], "pp=3 does not divide 4 GPUs"),
    (["estimate", "tiny-llama", "--gpus", "4", "--global-batch", "6"], "give a multiple of 4"),
    (["plan", "tiny-llama", "--gpus", "4", "--lora-targets", "q_proj"], "without lora_rank"),
    (["estimate", "tiny-llama", "--lora-targets", "q_proj"], "without lora_rank"),
    (["estimate", "tiny-llama", "--lora-rank", "100"], "use a rank of at most 32"),
    (["estimate", "tiny-llama", "--pp", "2", "--schedule", "interleaved"],
     "pp=2 x 2 chunks needs 4 layers, tiny-llama has 2"),
    (["estimate", "tiny-llama", "--pp", "2", "--virtual-stages", "2"],
     "needs the interleaved schedule"),
    (["estimate", "tiny-llama", "--pp", "2", "--num-microbatches", "3", "--schedule",
      "interleaved", "--virtual-stages", "1"], "micro-batches (3) a multiple of pp=2"),
])
def test_bad_input_one_line_exit_2(capsys, argv, match):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["estimate", "plan"])
def test_bad_choice_one_line_exit_2(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "tiny-llama", "--gpus", "4", "--zero", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice" in err and err.count("\n") == 1


def test_estimate_fits_only_within_the_reserve_plan_keeps(capsys):
    """99% of an 80 GiB card: estimate used to say it fits while plan refused it."""
    argv = ["estimate", "mistral-7b", "--gpus", "8", "--zero", "2", "--micro-batch", "2",
            "--num-microbatches", "8", "--seq-len", "4096", "--json"]
    rc, out, _ = run(capsys, *argv)
    doc = json.loads(out)
    assert rc == 0 and doc["usable_memory_bytes"] == int(0.95 * doc["gpu_memory_bytes"])
    assert doc["usable_memory_bytes"] < doc["per_gpu"]["total_bytes"] < doc["gpu_memory_bytes"]
    assert doc["fits"] is False
    rc, out, _ = run(capsys, *argv, "--memory-reserve", "0")
    assert json.loads(out)["fits"] is True


def test_bad_gpu_spec_file(capsys, tmp_path):
    spec = tmp_path / "gpu.json"
    spec.write_text(json.dumps({**asdict(CATALOG["l40s"]), "memory_bytes": "lots"}))
    rc, _, err = run(capsys, "estimate", "tiny-llama", "--gpu", str(spec))
    assert rc == 2 and "memory_bytes" in err and err.count("\n") == 1


@pytest.mark.slow
def test_console_script_exit_code_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "collie_compile", "estimate", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_estimate_prices_interleaved_as_the_planner_does(capsys):
    """estimate used to price an interleaved layout with one chunk per GPU while plan
    priced (and the runtime built) two."""
    from collie_compile.cost.estimate import estimate
    from collie_compile.planner.search import plan

    p = plan("llama-2-7b", gpus=8, gpu="a100-40gb", seq_len=4096, global_batch_size=64,
             schedule="interleaved", pp=4, dp=2, zero=1, recompute="full")
    c = p.chosen
    e = estimate("llama-2-7b", gpu="a100-40gb", dp=c.dp, tp=c.tp, pp=c.pp, zero=c.zero,
                 micro_batch_size=c.micro_batch_size, num_microbatches=c.num_microbatches,
                 seq_len=4096, recompute="full", schedule="interleaved")
    assert e.layout.virtual_stages == c.virtual_stages == 2
    if [b - a for a, b in c.stages] == [b - a for a, b in c.stages[:1]] * c.pp:  # even split
        assert e.memory.total_bytes == pytest.approx(c.memory_per_gpu_bytes, rel=1e-6)
    one = estimate("llama-2-7b", gpu="a100-40gb", dp=2, pp=4, zero=1, num_microbatches=8,
                   seq_len=4096, recompute="full", schedule="interleaved", virtual_stages=1)
    two = estimate("llama-2-7b", gpu="a100-40gb", dp=2, pp=4, zero=1, num_microbatches=8,
                   seq_len=4096, recompute="full", schedule="interleaved")
    # more chunks, more micro-batches in flight on the first stage
    assert two.memory.activations_bytes > one.memory.activations_bytes
    rc, out, _ = run(capsys, "estimate", "llama-2-7b", "--pp", "4", "--dp", "2",
                     "--schedule", "interleaved")
    assert rc == 0 and "schedule=interleaved (v=2)" in out


def test_train_takes_the_plan_flag_spellings():
    """plan and estimate say --micro-batch; train said only --micro-batch-size."""
    from collie_compile.cli import build_parser

    for flag in ("--micro-batch", "--micro-batch-size"):
        args = build_parser().parse_args(["train", "tiny-llama", "--data", "x", flag, "2"])
        assert args.micro_batch_size == 2


def test_estimate_takes_the_global_batch_as_plan_does(capsys):
    rc, out, _ = run(capsys, "estimate", "tiny-llama", "--gpus", "4", "--pp", "2",
                     "--micro-batch", "2", "--global-batch", "16", "--json")
    assert rc == 0 and json.loads(out)["layout"]["num_microbatches"] == 4  # 16 / (2 x 2)


def test_update_in_backward_flags_price_and_record_it(capsys, tmp_path):
    """estimate: no gradient at the peak; plan: chosen or pinned, recorded in the plan
    file, and priced with the measuring backward of two-pass clipping."""
    args = ["estimate", "llama-2-7b", "--gpus", "8", "--zero", "1", "--optimizer", "adamw",
            "--json"]
    _, after, _ = run(capsys, *args)
    _, inside, _ = run(capsys, *args, "--update-in-backward")
    after, inside = json.loads(after), json.loads(inside)
    assert inside["update_in_backward"] is True
    grads = after["per_gpu"]["grads_bytes"]
    assert grads > 0 and inside["per_gpu"]["grads_bytes"] == 0
    saved = after["per_gpu"]["total_bytes"] - inside["per_gpu"]["total_bytes"]
    assert saved >= 0.9 * grads  # the goal, in the model
    rc, _, err = run(capsys, "estimate", "llama-2-7b", "--gpus", "8", "--optimizer", "sgd",
                     "--update-in-backward")
    assert rc == 2 and "sgd cannot update inside backward" in err

    out = tmp_path / "p.json"
    plan_args = ["plan", "llama-2-7b", "--gpus", "8", "--global-batch", "8", "--optimizer",
                 "adamw", "--dp", "8", "--zero", "1", "--micro-batch", "1"]
    rc, text, _ = run(capsys, *plan_args, "--update-in-backward", "--out", str(out))
    assert rc == 0 and "update in backward" in text
    from collie_compile.planner.result import Plan

    p = Plan.load(out)
    assert p.update_in_backward and "--update-in-backward" in p.replan_command()
    # two-pass clipping doubles forward and backward: the choice goes to after-backward
    rc, text, _ = run(capsys, *plan_args, "--max-grad-norm", "1.0")
    assert rc == 0 and "update in backward" not in text.split("\n")[2]
    assert "updating inside backward is" in text or "no plan updating inside" in text
    clipped = plan("llama-2-7b", gpus=8, global_batch_size=8, dp=8, zero=1,
                   micro_batch_size=1, update_in_backward=True, max_grad_norm=1.0)
    plain = plan("llama-2-7b", gpus=8, global_batch_size=8, dp=8, zero=1,
                 micro_batch_size=1, update_in_backward=True)
    stale = plan("llama-2-7b", gpus=8, global_batch_size=8, dp=8, zero=1,
                 micro_batch_size=1, update_in_backward=True, max_grad_norm=1.0,
                 clip_mode="stale")
    assert clipped.chosen.step_time_s > 1.9 * plain.chosen.step_time_s
    assert stale.chosen.step_time_s == plain.chosen.step_time_s


def test_lora_targets_that_match_nothing_name_the_models_linears(capsys):
    """The hint suggested q_proj v_proj for GPT-2, which has neither."""
    rc, _, err = run(capsys, "estimate", "gpt2", "--lora-rank", "8", "--seq-len", "64")
    assert rc == 2 and "its blocks' linears are c_attn, c_fc, c_proj" in err, err


def test_json_outputs_are_what_the_docs_list(capsys):
    """docs/cli.md listed fewer keys of `estimate --json` than it prints; an interleaved
    plan's `stages` read as the layers each rank holds, which they are not."""
    import re

    from collie_compile.models.registry import load_config, with_layers
    from collie_compile.planner.search import plan

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    listed = doc.split("`--json` prints exactly `", 1)[1].split("`", 1)[0]
    rc, out, _ = run(capsys, "estimate", "tiny-llama", "--json")
    printed = json.loads(out)
    keys = set(printed) | {k for v in printed.values() if isinstance(v, dict) for k in v}
    assert rc == 0 and set(re.findall(r"[a-z_]+", listed)) == keys
    p = plan(with_layers(load_config("tiny-llama"), 8), gpus=2, seq_len=16,
             global_batch_size=8, pp=2, schedule="interleaved", virtual_stages=2)
    ranks = p.summary()["plan"]["layers_per_rank"]
    assert len(ranks) == 2 and all(len(r) == 2 for r in ranks)  # v chunks a rank
    for (a, b), mine in zip(p.chosen.stages, ranks, strict=True):  # as many as priced
        assert sum(hi - lo + 1 for lo, hi in mine) == b - a + 1
    held = sorted(i for r in ranks for lo, hi in r for i in range(lo, hi + 1))
    assert held == list(range(8))
