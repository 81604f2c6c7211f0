"""Which plan a run follows: one solved for it, or one given and checked against what the
run asks for (model, GPUs, optimizer, dtype, shapes, LoRA): a plan runs as priced."""

from __future__ import annotations

from pathlib import Path

from collie_compile.config import FINE_TUNING_SEQUENCES_PER_GPU
from collie_compile.cost.estimate import check_heads
from collie_compile.cost.hardware import CATALOG, get_gpu, local_gpu
from collie_compile.errors import CollieError, flag
from collie_compile.layout import canonical_lora_targets
from collie_compile.models.prompts import virtual_tokens
from collie_compile.planner.result import Plan, lora_flags
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime.options import FusedOptions, lora_plan_args
from collie_compile.runtime.program import head_layout


def resolve_plan(plan: str | Plan | Path, cfg: object, name: str, world: int,
                  gpu: str | None,
                  optimizer: str | None, dtype: str, seq_len: int | None,
                  global_batch_size: int | None, pins: dict, lora: object | None,
                  memory_reserve: float | None = None, refusal: str | None = None,
                  update_in_backward: bool | None = None,
                  fused: FusedOptions | None = None, num_params: int | None = None) -> Plan:
    """The plan this run follows: solved for it (``plan`` \"auto\") or given (a Plan or
    a plan file), checked against the model (``num_params`` of it), the world and what the
    run asks for."""
    from collie_compile.planner.search import plan as solve

    lora_rank, lora_targets = lora_plan_args(lora)
    clipping = dict(max_grad_norm=fused.max_grad_norm, clip_mode=fused.clip_mode) if fused \
        else {}
    if isinstance(plan, Plan):
        p = plan
    elif str(plan).lower() == "auto":
        p = solve(cfg, gpus=world, gpu=gpu or local_gpu(),
                  gpus_per_node=cdist.local_world_size(),
                  seq_len=seq_len,
                  global_batch_size=global_batch_size or FINE_TUNING_SEQUENCES_PER_GPU * world,
                  optimizer=optimizer or "adamw",
                  dtype=dtype, lora_rank=lora_rank,
                  lora_targets=lora_targets, tp_refusal=refusal,
                  virtual_tokens=virtual_tokens(lora),
                  lora_dora=bool(getattr(lora, "use_dora", False)),
                  update_in_backward=update_in_backward, **clipping,
                  **({} if memory_reserve is None else {"memory_reserve": memory_reserve}),
                  **pins)
        if not p.feasible:
            raise CollieError(f"no plan fits {world} x {p.gpu}: the closest is "
                              f"{p.shortfall_bytes / 2**30:.1f} GiB over; "
                              f"{'; '.join(p.suggestions) or 'use more GPUs'}")
        if gpu is None and p.gpu not in CATALOG:
            p.notes.append(f"{p.gpu} is not in the GPU catalog: planned with a100-80gb's "
                           "rates and the memory torch reports; for its own, run "
                           "`collie-compile calibrate --out SPEC.json` on it and pass "
                           "gpu='SPEC.json' (train --gpu SPEC.json)")
    else:
        p = Plan.load(plan)
    counted = bool(p.num_params and num_params is not None)
    if counted and p.num_params != num_params:
        raise CollieError(f"the plan is for {p.model!r} of {p.num_params:,} parameters, but "
                          f"this model ({name!r}) has {num_params:,}; plan this model "
                          "(collie-compile plan) or pass plan='auto'")
    if not counted and p.model != name:  # a plan file from before the count
        raise CollieError(f"the plan is for model {p.model!r} but this model is {name!r}; "
                          "plan this model (collie-compile plan) or pass plan='auto'")
    if str(plan).lower() != "auto":
        if memory_reserve is not None:  # it would be ignored: the plan's memory is priced
            raise CollieError(f"memory_reserve applies to plan='auto'; this plan was priced "
                              f"with {p.usable_memory_bytes / 2**30:.2f} GiB usable per GPU. "
                              "Re-plan with yours: collie-compile plan ... --memory-reserve "
                              f"{memory_reserve}")
        _check_given_plan(p, optimizer, dtype, seq_len, global_batch_size,
                          {**pins, "update_in_backward": update_in_backward,
                           "gpu": get_gpu(gpu).name if gpu else None})
        _check_plan_lora(p, lora_rank, lora_targets)
        _check_plan_adapters(p, virtual_tokens(lora), bool(getattr(lora, "use_dora", False)))
    c = p.chosen
    layers = int(cfg.num_hidden_layers)
    if c is None or len(c.recompute) != layers:
        raise CollieError(f"the plan's layer count does not match {name}'s {layers} layers")
    if c.dp * c.tp * c.pp != world:
        raise CollieError(f"the plan is for {c.dp * c.tp * c.pp} GPUs (dp={c.dp} tp={c.tp} "
                          f"pp={c.pp}) but this job has {world} processes")
    heads, kv, _ = head_layout(cfg)
    check_heads(name, heads, kv, c.tp)
    local = cdist.local_world_size()
    if c.tp > local or local % c.tp:  # tp groups are consecutive ranks: keep them on a node
        raise CollieError(f"the plan's tp={c.tp} would span nodes of {local} processes; "
                          f"re-plan with --gpus-per-node {local}")
    return p


def _check_given_plan(p: Plan, optimizer: str | None, dtype: str, seq_len: int | None,
                      global_batch_size: int | None, pins: dict) -> None:
    """A plan is priced for one optimizer, dtype and shape: run it as priced, or say which
    argument disagrees (silently overriding either would void the memory estimate)."""
    if not p.feasible or p.chosen is None:
        raise CollieError("the plan does not fit its GPUs (it was saved as the closest "
                          "infeasible plan); re-plan with its suggestions: "
                          f"{'; '.join(p.suggestions) or 'more GPUs'}")
    c = p.chosen
    planned = dict(gpu=p.gpu, optimizer=p.optimizer, dtype=p.dtype, seq_len=p.seq_len,
                   global_batch_size=p.global_batch_size, dp=c.dp, tp=c.tp, pp=c.pp,
                   zero=c.zero, micro_batch_size=c.micro_batch_size, schedule=c.schedule,
                   virtual_stages=c.virtual_stages, update_in_backward=c.update_in_backward,
                   ep=c.ep,
                   recompute=c.recompute[0] if len(set(c.recompute)) == 1 else "mixed")
    asked = dict(optimizer=optimizer and optimizer.lower(), dtype=dtype, seq_len=seq_len,
                 global_batch_size=global_batch_size, **pins)
    differ = [k for k in planned if asked.get(k) is not None and asked[k] != planned[k]]
    if differ:
        raise CollieError(
            "the plan was priced for other settings than asked: "
            + ", ".join(f"{k}={asked[k]!r} (plan: {planned[k]!r})" for k in differ)
            + "; pass the plan's values to run it as priced, or re-plan with yours: "
            + "collie-compile plan ... " + " ".join(f"{flag(k)} {asked[k]}" for k in differ))


def _check_plan_adapters(p: Plan, virtual: int, dora: bool) -> None:
    """The adapters' own additions the plan priced: a prompt method's virtual tokens
    lengthen what the model runs, DoRA keeps more for backward."""
    if (p.virtual_tokens, p.lora_dora) == (virtual, dora):
        return
    raise CollieError(f"the plan was priced for {p.virtual_tokens} virtual tokens"
                      f"{' and DoRA' if p.lora_dora else ''}, and this run has {virtual}"
                      f"{' and DoRA' if dora else ''}; plan this run's adapters: "
                      "plan='auto' (train --plan auto)")


def _check_plan_lora(p: Plan, rank: int | None, targets: str | list[str] | None) -> None:
    """A plan priced for LoRA underestimates full training's memory, and one priced for
    full training gives up what LoRA saves: the run must train what the plan priced."""
    norm = canonical_lora_targets
    if p.lora_rank == rank and (rank is None or norm(p.lora_targets) == norm(targets)):
        return

    def what(r: int | None, t: str | list[str] | None) -> str:
        return "full training" if r is None else f"LoRA rank {r} on {norm(t)}"

    raise CollieError(f"the plan was priced for {what(p.lora_rank, p.lora_targets)} but this "
                      f"run asks for {what(rank, targets)}; run it with "
                      f"{lora_flags(p.lora_rank, p.lora_targets)} (parallelize: lora_rank=, "
                      f"lora_targets=), or re-plan: collie-compile plan ... "
                      f"{lora_flags(rank, targets)}")
