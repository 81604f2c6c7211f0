import json
import random

import pulp
import pytest

from collie_compile.cli import main
from collie_compile.cost.hardware import get_gpu
from collie_compile.cost.memory import Layout, MemoryModel
from collie_compile.cost.profile import profile_model
from collie_compile.errors import CollieError
from collie_compile.layout import RECOMPUTE
from collie_compile.models.registry import load_config, with_layers
from collie_compile.optim.specs import get_optimizer
from collie_compile.planner.result import Plan
from collie_compile.planner.search import _problem, plan, solve_brute, solve_ilp

EXACT = pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=0)


def _random_problem(rng):
    layers = rng.randint(2, 6)
    cfg = with_layers(load_config("tiny-llama"), layers)
    prof = profile_model(cfg, seq_len=rng.choice([32, 64]), dtype="fp32")
    pp = rng.choice([p for p in (1, 2, 3) if p <= layers])
    dp, tp = rng.choice([1, 2]), rng.choice([1, 2])
    m = rng.choice([1, 2, 4])
    lay = Layout(dp=dp, tp=tp, pp=pp, zero=rng.choice([0, 1, 2, 3]) if dp > 1 else 0,
                 micro_batch_size=rng.choice([1, 2, 4]), seq_len=prof.seq_len,
                 num_microbatches=m, schedule=rng.choice(["1f1b", "gpipe"]))
    opt = get_optimizer(rng.choice(["adamw", "lion", "lomo", "sgd"]))
    gpu = get_gpu(rng.choice(["a100-80gb", "rtx3090"]))
    mm = MemoryModel(prof, opt)
    probe = _problem(lay, prof, gpu, opt, mm, RECOMPUTE, 1e30, 8)
    # a capacity between the leanest and the fattest split, so memory binds
    lo = probe.min_peak()
    hi = probe.peak([{"none": n} for n in [layers - pp + 1] + [1] * (pp - 1)])
    probe.capacity = lo + rng.random() * (hi - lo) * 1.1
    return probe


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40))
def test_ilp_matches_brute_force(seed):
    prob = _random_problem(random.Random(seed))
    brute = solve_brute(prob)
    ilp = solve_ilp(prob, EXACT)
    assert (brute is None) == (ilp is None)
    if brute is not None:
        assert prob.fits(ilp)
        assert sum(sum(s.values()) for s in ilp) == prob.layers
        assert prob.objective(ilp) == pytest.approx(prob.objective(brute), rel=1e-9)


@pytest.fixture(scope="module")
def llama70b():
    return plan("llama-2-70b", gpus=64, gpu="h100-80gb", seq_len=4096)


@pytest.mark.slow
def test_plan_beats_hand_tuned_layout(llama70b):
    """Megatron-style tp=8 pp=4 ZeRO-1 for Llama-2-70B on 64 GPUs, priced by the same model."""
    hand = plan("llama-2-70b", gpus=64, gpu="h100-80gb", seq_len=4096, tp=8, pp=4, zero=1,
                schedule="1f1b", micro_batch_size=1)
    assert hand.feasible and llama70b.feasible
    assert (hand.chosen.tp, hand.chosen.pp, hand.chosen.zero) == (8, 4, 1)
    assert llama70b.chosen.step_time_s <= hand.chosen.step_time_s
    assert llama70b.chosen.tokens_per_gpu_per_s >= hand.chosen.tokens_per_gpu_per_s
    c = llama70b.chosen
    assert c.dp * c.tp * c.pp == 64 and c.tp <= 8
    assert len(c.recompute) == 80 and c.stages[0][0] == 0 and c.stages[-1][1] == 79
    assert c.memory_per_gpu_bytes <= llama70b.usable_memory_bytes
    assert 0.2 < c.mfu < 0.7
    for alt in llama70b.alternatives:
        assert alt.step_time_s >= c.step_time_s and alt.why_not


@pytest.mark.slow
def test_plan_round_trips_and_is_deterministic(llama70b, tmp_path):
    path = tmp_path / "plan.json"
    llama70b.save(path)
    assert Plan.load(path) == llama70b
    again = plan("llama-2-70b", gpus=64, gpu="h100-80gb", seq_len=4096)
    assert again.summary()["plan"] == llama70b.summary()["plan"]


def test_corrupted_plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"collie_compile_plan": 1, "model": "x"')
    with pytest.raises(CollieError, match="not valid JSON"):
        Plan.load(path)
    path.write_text(json.dumps({"collie_compile_plan": 1, "model": "x", "bogus": 1}))
    with pytest.raises(CollieError, match="corrupted"):
        Plan.load(path)
    good = json.loads(plan("tiny-llama", gpus=2, seq_len=16, global_batch_size=4).to_json())
    for field, value, match in [("schedule", "zigzag", "unknown schedule"),
                                ("zero", 7, "zero=7"),
                                ("recompute", ["none"] * 5, "cover 2 layers but"),
                                ("recompute", ["none", "half"], "unknown recompute"),
                                ("micro_batch_size", 0, "positive")]:
        path.write_text(json.dumps({**good, "chosen": {**good["chosen"], field: value}}))
        with pytest.raises(CollieError, match=match):  # hand edits the runtime would trip on
            Plan.load(path)
    for field, value, match in [("micro_batch_size", 4, r"dp x micro-batch x micro-batches"),
                                ("dp", 1, r"dp\*tp\*pp = 1 but gpus = 2")]:
        path.write_text(json.dumps({**good, "chosen": {**good["chosen"], field: value}}))
        with pytest.raises(CollieError, match=match):  # sizes that do not multiply out
            Plan.load(path)
    # an edit that runs but leaves the priced figures describing another plan: refused,
    # with the command that prices the layout asked for
    c = good["chosen"]
    path.write_text(json.dumps({**good, "chosen": {**c, "recompute": ["full", "full"]}}))
    with pytest.raises(CollieError, match=r"edited after it was priced.*collie-compile plan "
                                          r"tiny-llama --gpus 2 .* --recompute full --out"):
        Plan.load(path)
    path.write_text(json.dumps({**good, "notes": ["mine"]}))  # prose is not priced
    assert Plan.load(path).notes == ["mine"]
    # a file written before fields were added (update_in_backward, clipping) still loads,
    # its digest over what it holds
    from collie_compile.planner.result import _fingerprint

    old = {k: v for k, v in good.items() if k not in ("max_grad_norm", "clip_mode")}
    old["chosen"] = {k: v for k, v in c.items() if k != "update_in_backward"}
    old["alternatives"] = [{k: v for k, v in a.items() if k != "update_in_backward"}
                           for a in good["alternatives"]]
    old["priced"] = _fingerprint({k: v for k, v in old.items()
                                  if k not in ("priced", "collie_compile_plan")})
    path.write_text(json.dumps(old))
    assert Plan.load(path).update_in_backward is False
    path.write_text(json.dumps({**good, "collie_compile_plan": 2}))
    with pytest.raises(CollieError, match="another format than this collie-compile reads"):
        Plan.load(path)


def test_lomo_anchor_through_plan():
    kw = dict(gpus=8, gpu="rtx3090", seq_len=512, global_batch_size=8)
    adamw = plan("llama-65b", optimizer="adamw", **kw)
    lomo = plan("llama-65b", optimizer="lomo", **kw)
    assert not adamw.feasible and lomo.feasible
    assert adamw.shortfall_bytes > 0
    assert any("lomo" in s for s in adamw.suggestions)
    assert any("--lora-rank 8" in s for s in adamw.suggestions)  # checked to fit, like the rest


def test_suggestions_keep_the_pins():
    """Each suggestion is one change to the request as given: they used to be checked
    without the pins, so four of five still did not fit once applied."""
    p = plan("llama-2-7b", gpus=8, seq_len=2048, tp=8, micro_batch_size=64, recompute="none")
    assert not p.feasible
    assert p.suggestions[0] == "drop the pins (--tp --micro-batch): the planner's own choice fits"
    assert "allow recomputation (--recompute full)" in p.suggestions
    assert not any("GPUs" in x or "lomo" in x for x in p.suggestions)  # neither fits pinned


def test_pins_are_respected_and_bad_pins_explained():
    p = plan("tiny-llama", gpus=4, gpu="rtx3090", seq_len=64, tp=2, recompute="full")
    assert p.chosen.tp == 2 and set(p.chosen.recompute) == {"full"}
    # each unmeetable pin says which rule it breaks (was one generic sentence for all)
    for pins, why in [(dict(gpus=6, tp=3), "tp=3 does not divide tiny-llama's 4 attention"),
                      (dict(gpus=4, dp=3), "dp=3 does not divide 4 GPUs"),
                      (dict(gpus=8, tp=8, gpus_per_node=4), "tp=8 would span nodes of 4"),
                      (dict(gpus=4, pp=4), "pp=4 needs 4 layers, tiny-llama has 2"),
                      (dict(gpus=2, pp=2, zero=2), "zero=2 shards over data-parallel ranks"),
                      (dict(gpus=4, dp=4, schedule="gpipe"), "gpipe schedule needs pp > 1"),
                      (dict(gpus=2, pp=2, global_batch_size=1), "needs at least 2 micro-b"),
                      (dict(gpus=4, micro_batch_size=3, global_batch_size=8),
                       r"dp x micro-batch \(4 x 3\) does not divide the global batch 8")]:
        with pytest.raises(CollieError, match=f"no layout of {pins['gpus']} GPUs.*{why}"):
            plan("tiny-llama", seq_len=64, **pins)
    with pytest.raises(CollieError, match=r"zero \(--zero\) must be 0, 1, 2 or 3"):
        plan("tiny-llama", gpus=4, seq_len=64, zero=4)
    # a pinned micro-batch need not be one of the sizes the search tries on its own
    odd = plan("tiny-llama", gpus=4, seq_len=64, global_batch_size=48, micro_batch_size=3)
    assert odd.feasible and odd.chosen.micro_batch_size == 3 and odd.chosen.dp * 3 * \
        odd.chosen.num_microbatches == 48


def test_a_given_plan_runs_as_priced_or_says_what_differs():
    """parallelize(plan=file) used to override the plan's optimizer and pins silently."""
    from dataclasses import replace

    from collie_compile.runtime.resolve import _check_given_plan

    p = plan("tiny-llama", gpus=4, seq_len=64, global_batch_size=8, dtype="fp32", zero=1)
    same = dict(optimizer="adamw", dtype="fp32", seq_len=64, global_batch_size=8)
    _check_given_plan(p, **same, pins={})
    _check_given_plan(p, **same, pins={"zero": 1, "dp": p.chosen.dp})
    with pytest.raises(CollieError, match=r"optimizer='lomo' \(plan: 'adamw'\), zero=3"):
        _check_given_plan(p, **{**same, "optimizer": "lomo"}, pins={"zero": 3})
    with pytest.raises(CollieError, match=r"dtype='bf16' \(plan: 'fp32'\)"):
        _check_given_plan(p, **{**same, "dtype": "bf16"}, pins={})
    with pytest.raises(CollieError, match="does not fit its GPUs"):
        _check_given_plan(replace(p, feasible=False), **same, pins={})


def test_plan_cli_json_keys_and_exit_codes(capsys):
    rc = main(["plan", "tiny-llama", "--gpus", "4", "--seq-len", "64", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(doc) == {"feasible", "solve_time_s", "model", "gpus", "gpu", "plan",
                        "alternatives", "usable_memory_bytes", "shortfall_bytes",
                        "suggestions", "notes"}
    keys = {"dp", "tp", "pp", "ep", "zero", "micro_batch_size", "num_microbatches", "schedule",
            "virtual_stages", "recompute", "stages", "memory_per_gpu_bytes", "step_time_s",
            "tokens_per_gpu_per_s", "mfu", "update_in_backward", "layers_per_rank"}
    assert set(doc["plan"]) == keys
    assert all(set(a) == keys | {"why_not"} for a in doc["alternatives"])
    rc = main(["plan", "llama-65b", "--gpus", "8", "--gpu", "rtx3090", "--seq-len", "512",
               "--global-batch", "8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 3 and doc["feasible"] is False and doc["plan"] is not None
    assert doc["shortfall_bytes"] > 0 and any("lomo" in x for x in doc["suggestions"])


@pytest.mark.slow
def test_lora_plan_needs_less_memory_than_full_fine_tuning():
    full = plan("llama-2-7b", gpus=8, gpu="a100-40gb", seq_len=2048, global_batch_size=64,
                zero=1, micro_batch_size=1, recompute="full")
    lora = plan("llama-2-7b", gpus=8, gpu="a100-40gb", seq_len=2048, global_batch_size=64,
                zero=1, micro_batch_size=1, recompute="full", lora_rank=16)
    assert lora.lora_rank == 16 and lora.feasible
    assert lora.chosen.memory_per_gpu_bytes < 0.8 * full.chosen.memory_per_gpu_bytes


@pytest.mark.slow
def test_lora_targets_are_priced_and_checked(tmp_path):
    kw = dict(gpus=8, gpu="a100-40gb", seq_len=2048, global_batch_size=64, zero=1,
              micro_batch_size=1, recompute="full", lora_rank=16)
    qv = plan("llama-2-7b", **kw)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wide = plan("llama-2-7b", lora_targets=every, **kw)
    # adapters on all seven linears: more trainable parameters, so more memory
    assert wide.chosen.memory_per_gpu_bytes > qv.chosen.memory_per_gpu_bytes
    assert wide.lora_targets == sorted(every) and qv.lora_targets == ["q_proj", "v_proj"]
    wide.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == wide
    with pytest.raises(CollieError, match="without lora_rank"):
        plan("llama-2-7b", gpus=8, lora_targets=["q_proj"])
    with pytest.raises(CollieError, match="no linear of llama-2-7b matches"):
        plan("llama-2-7b", gpus=8, lora_rank=8, lora_targets=["qkv"])
    with pytest.raises(CollieError, match="at most 4096"):
        plan("llama-2-7b", gpus=8, lora_rank=100_000)


def test_a_given_plan_must_train_what_it_priced():
    """A LoRA plan run as full training would underestimate memory by gradients and
    optimizer states of every weight; parallelize used to plan LoRA runs as full ones."""
    from collie_compile.runtime.options import lora_config, lora_plan_args
    from collie_compile.runtime.resolve import _check_plan_lora

    p = plan("tiny-llama", gpus=2, seq_len=64, global_batch_size=4, lora_rank=4)
    _check_plan_lora(p, 4, ["v_proj", "q_proj"])  # the default targets, in any order
    _check_plan_lora(p, *lora_plan_args(lora_config(None, 4, None, None, 0.0)))
    with pytest.raises(CollieError, match=r"priced for LoRA rank 4 .* asks for full training; "
                                          r"run it with --lora-rank 4 --lora-targets q_proj v_"):
        _check_plan_lora(p, None, None)
    with pytest.raises(CollieError, match=r"re-plan: .* --lora-rank 8 --lora-targets o_proj"):
        _check_plan_lora(p, 8, ["o_proj"])
    with pytest.raises(CollieError, match="without lora_rank"):
        lora_config(None, None, None, ["q_proj"], 0.0)


def test_a_plan_file_records_and_checks_what_adapters_add(tmp_path):
    """DoRA's activations and a prompt's virtual tokens are priced, written to the plan
    file, read back, and a run with other adapters than priced is refused."""
    from collie_compile.planner.result import Plan
    from collie_compile.runtime.resolve import _check_plan_adapters

    p = plan("tiny-llama", gpus=1, seq_len=48, global_batch_size=4, lora_rank=1,
             lora_targets=[], virtual_tokens=16)
    p.save(tmp_path / "prompt.json")
    back = Plan.load(tmp_path / "prompt.json")
    assert (back.virtual_tokens, back.lora_dora) == (16, False)
    _check_plan_adapters(back, 16, False)
    with pytest.raises(CollieError, match="priced for 16 virtual tokens, and this run has 0"):
        _check_plan_adapters(back, 0, False)
    dora = plan("tiny-llama", gpus=1, seq_len=64, global_batch_size=4, lora_rank=4,
                lora_dora=True)
    assert Plan.from_json(dora.to_json()).lora_dora
    with pytest.raises(CollieError, match="0 virtual tokens and DoRA, and this run has 0;"):
        _check_plan_adapters(dora, 0, False)


@pytest.mark.slow
def test_interleaved_ranks_hold_what_their_stage_was_priced_for():
    """Interleaved, rank k's chunks take stage k's block count and recompute modes (the
    runtime used to cut pp x v even chunks and read modes by layer index, so a rank could
    hold a mix the planner never priced: 44 GiB where 37 GiB was planned)."""
    from collie_compile.planner.result import Candidate

    c = Candidate(dp=1, tp=1, pp=2, zero=0, micro_batch_size=1, num_microbatches=4,
                  schedule="interleaved", virtual_stages=2,
                  recompute=["full", "full", "none", "none", "none", "selective", "none", "none"],
                  stages=[[0, 4], [5, 7]], memory_per_gpu_bytes=0, step_time_s=0.0,
                  tokens_per_gpu_per_s=0.0, mfu=0.0)
    assert c.chunks() == [[0, 2], [3, 4], [5, 6], [7, 7]]  # rank 0: 3+2 blocks, rank 1: 2+1
    assert c.layer_modes() == ["full", "full", "none", "selective", "none", "none", "none",
                               "none"]
    p = plan("llama-2-7b", gpus=8, gpu="a100-40gb", seq_len=4096, global_batch_size=64,
             schedule="interleaved", pp=4, dp=2, zero=1)
    ch = p.chosen
    assert ch.virtual_stages == 2 and len(set(ch.recompute)) > 1  # a mixed plan
    chunks, modes = ch.chunks(), ch.layer_modes()
    for k, (a, b) in enumerate(ch.stages):
        held = [i for lo, hi in chunks[k::ch.pp] for i in range(lo, hi + 1)]
        assert sorted(modes[i] for i in held) == sorted(ch.recompute[a:b + 1])


def test_default_global_batch_lets_every_dp_divide_it():
    """On 6 GPUs the default (~2M tokens: 512 x 4096) ruled out dp=3 and dp=6; it is now
    rounded up to a multiple of the GPU count."""
    p = plan("llama-2-7b", gpus=6, seq_len=4096, gpu="a100-80gb")
    assert p.global_batch_size == 516 and p.chosen.dp == 6
    with pytest.raises(CollieError, match=r"\(--global-batch 516 would\)"):
        plan("llama-2-7b", gpus=6, seq_len=4096, global_batch_size=512, dp=6)


@pytest.mark.slow
def test_virtual_stages_can_be_pinned():
    p = plan("llama-2-7b", gpus=8, pp=4, virtual_stages=4, seq_len=4096, global_batch_size=64)
    c = p.chosen
    assert c.schedule == "interleaved" and c.virtual_stages == 4 and len(c.chunks()) == 16
    with pytest.raises(CollieError, match="pp=2 x 4 chunks needs 8 layers, tiny-llama has 2"):
        plan("tiny-llama", gpus=2, pp=2, virtual_stages=4, seq_len=64)
    with pytest.raises(CollieError, match="must be 2 or more"):
        plan("tiny-llama", gpus=2, virtual_stages=1, seq_len=64)


def test_plans_say_the_zero_stage_that_runs():
    """A LOMO plan said zero=1 while ZeRO-0 ran (a rule with no state has nothing for
    ZeRO-1 to shard); the re-plan command of a dp=1 plan pinned --zero 1, which the
    planner then refused."""
    p = plan("tiny-llama", gpus=2, seq_len=16, global_batch_size=4, optimizer="lomo")
    assert all(c.zero != 1 for c in [p.chosen, *p.alternatives])
    p = plan("tiny-llama", gpus=2, seq_len=16, global_batch_size=4, dp=1, tp=2)
    cmd = p.replan_command()
    assert "--dp 1 --tp 2 --pp 1 --micro-batch" in cmd and "--zero" not in cmd
