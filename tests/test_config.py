"""Requests as data: every pin reaches every entry point, and is checked in one place."""

import inspect
from dataclasses import fields

import pytest

from collie_compile.cli import build_parser
from collie_compile.config import LoraRequest, Pins
from collie_compile.errors import CollieError
from collie_compile.planner.search import plan
from collie_compile.runtime.parallel_model import parallelize

PINS = {f.name for f in fields(Pins)}


def test_every_pin_reaches_every_entry_point():
    assert PINS == {"dp", "tp", "pp", "zero", "micro_batch_size", "schedule", "recompute",
                    "virtual_stages", "ep"}
    for fn in (plan, parallelize):
        assert PINS <= set(inspect.signature(fn).parameters), fn.__name__
    given = dict(dp="2", tp="1", pp="2", zero="1", micro_batch="4", schedule="interleaved",
                 recompute="full", virtual_stages="2", ep="2")
    argv = [x for k, v in given.items() for x in (f"--{k.replace('_', '-')}", v)]
    for command in (["plan", "tiny-llama", "--gpus", "4"], ["train", "tiny-llama", "--data", "x"],
                    ["check", "tiny-llama"]):
        pins = Pins.from_args(build_parser().parse_args(command + argv))
        assert pins == Pins(dp=2, tp=1, pp=2, zero=1, micro_batch_size=4,
                            schedule="interleaved", recompute="full", virtual_stages=2,
                            ep=2)


@pytest.mark.parametrize("pins, match", [
    (dict(tp=0), r"tp \(--tp\) must be a positive integer"),
    (dict(ep=0), r"ep \(--ep\) must be a positive integer"),
    (dict(zero=4), r"zero \(--zero\) must be 0, 1, 2 or 3"),
    (dict(schedule="zigzag"), "unknown schedule"),
    (dict(recompute="half"), "unknown recompute"),
    (dict(virtual_stages=1), "must be 2 or more"),
    (dict(virtual_stages=2, schedule="gpipe"), "applies to the interleaved schedule"),
])
def test_bad_pins_are_refused_the_same_everywhere(pins, match):
    with pytest.raises(CollieError, match=match):
        Pins(**pins)
    with pytest.raises(CollieError, match=match):  # before any model is profiled
        plan("no-such-model", gpus=4, **pins)


def test_lora_request_checks():
    assert LoraRequest() == LoraRequest(rank=None)
    with pytest.raises(CollieError, match="without lora_rank"):
        LoraRequest(targets=("q_proj",))
    with pytest.raises(CollieError, match="without lora_rank"):
        LoraRequest(alpha=16.0)
    with pytest.raises(CollieError, match="lora_rank"):
        LoraRequest(rank=0)


def test_a_model_given_as_a_config_or_a_path_needs_no_seq_len(tmp_path):
    """parallelize passes the model's own config to the planner (and users pass paths):
    the default sequence length and the profile come from either."""
    from pathlib import Path

    from collie_compile.cost.estimate import default_seq_len, estimate
    from collie_compile.models.registry import load_config

    cfg = load_config("tiny-llama")
    assert plan(cfg, gpus=1, quick=True, dtype="fp32").seq_len == 256  # its context
    cfg.save_pretrained(tmp_path)
    assert default_seq_len(Path(tmp_path)) == 256
    by_path = estimate(Path(tmp_path) / "config.json", gpus=1, seq_len=32, dtype="fp32")
    assert by_path.num_params == estimate("tiny-llama", gpus=1, seq_len=32,
                                          dtype="fp32").num_params


@pytest.mark.parametrize("asked, match", [
    (dict(gpus=0), r"gpus \(--gpus\) must be a positive integer"),
    (dict(seq_len=1), r"seq_len \(--seq-len\) must be a positive integer of at least 2"),
    (dict(global_batch_size=0), r"global_batch_size \(--global-batch\) must be positive"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(memory_reserve=1.0), r"memory_reserve \(--memory-reserve\) must be in \[0, 1\)"),
])
def test_a_bad_request_is_refused_by_every_entry_point(asked, match):
    import torch

    from collie_compile.cost.estimate import estimate

    with pytest.raises(CollieError, match=match):
        plan("tiny-llama", **{"gpus": 2, **asked})
    if "global_batch_size" not in asked:
        with pytest.raises(CollieError, match=match):
            estimate("tiny-llama", **asked)
    with pytest.raises(CollieError, match=match):  # before any process group is needed
        parallelize(torch.nn.Linear(2, 2), **asked)
