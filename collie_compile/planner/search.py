"""Choose the fastest plan that fits: enumerate the outer space, solve an ILP inside.

Outer space (enumerated, pruned by a lower bound on step time): tp (within a node,
dividing the attention heads, compatible with the KV heads), pp <= layers, dp = the
rest; ZeRO stage; ep for a mixture of experts (dividing dp and the expert count, the ep
group inside a node); micro-batch size b (m = global_batch / (dp * b) micro-batches);
pipeline schedule; for Lion, AdamW, Adam and Adan, whether the update runs after
backward or inside it (no gradient buffer at the peak, but two forward/backward passes
with two-pass clipping). Inside each outer point, an integer program places decoder blocks on
stages and picks their recomputation. Blocks are identical, so the variables count
blocks per (stage, mode) rather than name them: the ILP has O(pp) variables for any depth.

Inside an outer point the work splits in two, exactly:

1. Per stage k and block count n, the best configuration: the recompute mix (blocks per
   mode) with the least compute time whose peak memory fits. Time and memory are linear in
   the mix, so this is a table over all mixes, computed with numpy (``stage_options``).
2. An assignment ILP picks one block count per stage:

  variables   x[k,n] in {0,1}    stage k holds n blocks (its best mix for n)
              T, D, U >= 0       slowest stage per micro-batch, exposed DP sync, update
  objective   minimise  P * (B * T + D) + U       B = m + pp - 1 (interleaved: m + (pp-1)/v),
                                                  P = 2 with a measuring pass, else 1
  s.t.        sum_n x[k,n] = 1                    one count per stage
              sum_{k,n} n x[k,n] = L              every block placed
              T >= sum_n x[k,n] t[k,n]            compute + TP all-reduces + sends, and
                                                  ZeRO traffic (max, or sum if no overlap)
              D >= sum_n x[k,n] d[k,n]            gradient sync left after the last backward
              U >= sum_n x[k,n] u[k,n]            optimizer step
  (memory is in the tables: x[k,n] exists only where some mix of n blocks fits on stage k)

All coefficients come from :mod:`collie_compile.cost.memory` and
:mod:`collie_compile.cost.step_time`, which also evaluate a concrete split, so the ILP's optimum
is checked against brute force over the same model in the tests.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import pulp

from collie_compile.config import LoraRequest, Pins, Request
from collie_compile.cost.estimate import default_seq_len, layout_problem
from collie_compile.cost.hardware import GPUSpec, get_gpu
from collie_compile.cost.memory import Layout, MemoryModel, StageTerms, lora_cost
from collie_compile.cost.profile import ModelProfile, profile_model
from collie_compile.cost.step_time import (
    StageTime,
    bubble_factor,
    model_flops_per_step,
    stage_time,
    step_time,
)
from collie_compile.errors import CollieError, flag, named
from collie_compile.layout import (
    EXPERT_IMBALANCE,
    INTERLEAVED_CHUNKS,
    RECOMPUTE,
    SCHEDULES,
    canonical_lora_targets,
    even_split,
)
from collie_compile.models.registry import load_config
from collie_compile.optim.specs import OptimizerSpec, get_optimizer
from collie_compile.planner.result import Candidate, Plan
from collie_compile.planner.sharding import linear_layout, solve_block_sharding

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
ILP_TIME_LIMIT_S = 20  # per inner ILP, a safety net: these solve in milliseconds


@dataclass(frozen=True)
class Outer:
    """A point of the enumerated space; the ILP fills in blocks and recomputation."""

    layout: Layout
    in_backward: bool = False  # the optimizer updates inside backward

    def key(self) -> tuple:
        lay = self.layout
        return (lay.tp, lay.pp, lay.dp, lay.zero, lay.micro_batch_size,
                SCHEDULES.index(lay.schedule), self.in_backward)


@dataclass
class Problem:
    """Everything the ILP and brute force need for one outer point."""

    layout: Layout
    layers: int
    modes: tuple[str, ...]
    memory: list[StageTerms]
    time: list[StageTime]
    capacity: float
    in_backward: bool = False

    @property
    def stages(self) -> int:
        return self.layout.pp

    def objective(self, counts: list[dict[str, int]]) -> float:
        return step_time(self.layout, self.time, counts)

    def fits(self, counts: list[dict[str, int]]) -> bool:
        return self.peak(counts) <= self.capacity

    def peak(self, counts: list[dict[str, int]]) -> float:
        return max(t.peak(n) for t, n in zip(self.memory, counts))

    def lower_bound(self) -> float:
        """A bound no split beats: blocks spread perfectly, none recomputed; the stage with
        the most blocks (at least ceil(L / pp)) pays at least the cheapest stage's sync and
        update for that many."""
        fastest = min(self.time[0].per_block[c] for c in self.modes)
        total = sum(t.fixed for t in self.time) + self.layers * fastest
        most = -(-self.layers // self.stages)
        one = {"none": most}
        slowest = max(total / self.stages, max(t.fixed for t in self.time),
                      min(t.zero3(one) for t in self.time))
        sync = min(min(t.exposed_sync(one),
                       t.exposed_sync({"none": self.layers - self.stages + 1}))
                   for t in self.time)
        update = min(t.update(one) for t in self.time)
        return self.time[0].passes * (bubble_factor(self.layout) * slowest + sync) + update

    def min_peak(self) -> float:
        """The lowest peak any split reaches: most memory-frugal mode, balanced split."""
        frugal = self.memory[0].frugal_mode(self.modes)
        split = even_split(self.layers, self.stages)
        return self.peak([{frugal: n} for n in split])


@dataclass
class StageOptions:
    """For one stage: per block count n, the fastest mix that fits and its costs (s)."""

    time: dict[int, float]  # per micro-batch, compute or ZeRO traffic, whichever is slower
    sync: dict[int, float]
    update: dict[int, float]
    mix: dict[int, dict[str, int]]


@functools.lru_cache(maxsize=64)
def _mixes(top: int, modes: tuple[str, ...], block_times: tuple[float, ...]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every mix of 1..top blocks over ``modes``, sorted by block count then time."""
    grid = np.stack(np.meshgrid(*[np.arange(top + 1)] * len(modes), indexing="ij"), -1)
    mixes = grid.reshape(-1, len(modes))
    n = mixes.sum(1)
    keep = (n >= 1) & (n <= top)
    mixes, n = mixes[keep], n[keep]
    compute = mixes @ np.array(block_times)
    order = np.lexsort((compute, n))
    return mixes[order], n[order], compute[order]


def stage_options(prob: Problem, k: int) -> StageOptions:
    """The fastest fitting mix for every block count on stage ``k``, from all mixes."""
    mem, tim, modes = prob.memory[k], prob.time[k], prob.modes
    top = prob.layers - prob.stages + 1
    mixes, n, compute = _mixes(top, modes, tuple(tim.per_block[c] for c in modes))
    peak = mem.peak({c: mixes[:, i] for i, c in enumerate(modes)})
    feasible = np.flatnonzero(peak <= prob.capacity)
    counts, first = np.unique(n[feasible], return_index=True)
    out = StageOptions({}, {}, {}, {})
    for cnt, i in zip(counts.tolist(), feasible[first].tolist()):
        if cnt < prob.layout.virtual_stages:  # every chunk of the rank holds a block
            continue
        mix = {c: int(v) for c, v in zip(modes, mixes[i])}
        out.mix[cnt] = mix
        out.time[cnt] = tim.hide(tim.fixed + float(compute[i]), tim.zero3(mix))
        out.sync[cnt] = tim.exposed_sync(mix)
        out.update[cnt] = tim.update(mix)
    return out


def solve_ilp(prob: Problem, solver: pulp.LpSolver, cutoff: float | None = None
              ) -> list[dict[str, int]] | None:
    """Optimal blocks per (stage, mode) for ``prob``, or None if nothing fits (or nothing
    beats ``cutoff`` seconds, which lets CBC prune at once)."""
    with warnings.catch_warnings():  # PuLP 3 announces its 4.0 API on every variable
        warnings.simplefilter("ignore", DeprecationWarning)
        return _solve_assignment(prob, solver, cutoff)


def _solve_assignment(prob: Problem, solver: pulp.LpSolver, cutoff: float | None
                      ) -> list[dict[str, int]] | None:
    L, P = prob.layers, prob.stages
    opts = [stage_options(prob, k) for k in range(P)]
    if any(not o.time for o in opts):
        return None
    ms = 1e3  # milliseconds: coefficients near 1 suit CBC
    lp = pulp.LpProblem("plan", pulp.LpMinimize)
    x = {(k, n): pulp.LpVariable(f"x_{k}_{n}", cat="Binary")
         for k in range(P) for n in opts[k].time}
    T = pulp.LpVariable("T", 0)
    D = pulp.LpVariable("D", 0)
    U = pulp.LpVariable("U", 0)
    objective = prob.time[0].passes * (bubble_factor(prob.layout) * T + D) + U
    lp += objective
    lp += pulp.lpSum(n * v for (_, n), v in x.items()) == L
    for k, o in enumerate(opts):
        xs = {n: x[k, n] for n in o.time}
        lp += pulp.lpSum(xs.values()) == 1
        lp += T >= pulp.lpSum(ms * o.time[n] * v for n, v in xs.items())
        lp += D >= pulp.lpSum(ms * o.sync[n] * v for n, v in xs.items())
        lp += U >= pulp.lpSum(ms * o.update[n] * v for n, v in xs.items())
    if cutoff is not None:
        lp += objective <= cutoff * ms
    status = lp.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        return None
    chosen = [next(n for n in opts[k].time if (x[k, n].value() or 0) > 0.5) for k in range(P)]
    return [opts[k].mix[n] for k, n in enumerate(chosen)]


def solve_brute(prob: Problem) -> list[dict[str, int]] | None:
    """Exhaustive search over the same space (small cases: tests, and CBC's fallback)."""
    best, best_t = None, math.inf
    for split in _compositions(prob.layers, prob.stages):
        per_stage = [list(_mode_counts(n, prob.modes)) for n in split]
        for counts in itertools.product(*per_stage):
            counts = list(counts)
            if not prob.fits(counts):
                continue
            t = prob.objective(counts)
            if t < best_t - 1e-12:
                best, best_t = counts, t
    return best


def _compositions(total: int, parts: int):
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _mode_counts(n: int, modes: tuple[str, ...]):
    for split in itertools.product(range(n + 1), repeat=len(modes) - 1):
        if sum(split) <= n:
            yield dict(zip(modes, (*split, n - sum(split))))


def _solver() -> tuple[pulp.LpSolver | None, str]:
    # Optimal to 1e-7: proving the last digits of a float objective is where CBC stalls.
    with warnings.catch_warnings():  # PuLP 3 announces its 4.0 API
        warnings.simplefilter("ignore", DeprecationWarning)
        cbc = pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=1e-7,
                                timeLimit=ILP_TIME_LIMIT_S)
    if cbc.available():
        return cbc, "cbc"
    for name in pulp.listSolvers(onlyAvailable=True):
        return pulp.getSolver(name, msg=False), name.lower()
    return None, "enumeration"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(model: str, gpus: int, gpu: str | GPUSpec = "a100-80gb", gpus_per_node: int = 8,
         seq_len: int | None = None, global_batch_size: int | None = None,
         optimizer: str = "adamw", dtype: str = "bf16", lora_rank: int | None = None,
         dp: int | None = None, tp: int | None = None, pp: int | None = None,
         zero: int | None = None, micro_batch_size: int | None = None,
         schedule: str | None = None, recompute: str | None = None,
         memory_reserve: float = 0.05, top_k: int = 3, quick: bool = False,
         lora_targets: str | list[str] | None = None,
         virtual_stages: int | None = None, tp_refusal: str | None = None,
         update_in_backward: bool | None = None, max_grad_norm: float | None = None,
         clip_mode: str = "two-pass", ep: int | None = None,
         expert_imbalance: float = EXPERT_IMBALANCE, virtual_tokens: int = 0,
         lora_dora: bool = False) -> Plan:
    """The fastest plan for training ``model`` on ``gpus`` GPUs that fits their memory.

    Any of dp, tp, pp, zero, micro_batch_size, schedule, virtual_stages (chunks per GPU
    of the interleaved schedule, which pinning it implies) and recompute may be pinned;
    the planner solves the rest. With ``lora_rank`` only LoRA adapters on
    ``lora_targets`` (peft's ``target_modules``; default q_proj, v_proj) train.
    ``memory_reserve`` is the fraction of each GPU's memory kept free (CUDA context,
    allocator fragmentation). ``quick`` stops at the first plan that fits and skips
    suggestions: a feasibility check. ``tp_refusal`` says why tp > 1 cannot run this model
    (:func:`collie_compile.runtime.refusals.tp_refusal`): then only tp = 1 is planned.
    ``update_in_backward`` pins where Lion, AdamW, Adam or Adan update (None: the faster,
    after backward on a tie); ``max_grad_norm`` with ``clip_mode`` "two-pass" prices the
    measuring backward an update inside backward then needs. ``ep`` pins expert
    parallelism for a mixture of experts (else the planner tries every ep dividing dp and
    the expert count within a node); ``expert_imbalance`` is the busiest ep rank's expert
    rows over the mean it prices. ``virtual_tokens`` (prompt methods) lengthen every
    sequence the model runs, not the data's: priced at ``seq_len + virtual_tokens``;
    ``lora_dora``: the adapters are DoRA's (more activations kept for backward).
    """
    start = time.perf_counter()
    Request(gpus=gpus, seq_len=seq_len, global_batch_size=global_batch_size, dtype=dtype,
            memory_reserve=memory_reserve)
    if top_k < 0:
        raise CollieError(f"top_k (runners-up to show) must be 0 or more, got {top_k}")
    if gpus_per_node < 1:
        raise CollieError(f"{named('gpus_per_node')} must be a positive integer, got "
                          f"{gpus_per_node}")
    LoraRequest(rank=lora_rank, targets=lora_targets)
    asked = Pins(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch_size=micro_batch_size,
                 schedule=schedule, recompute=recompute, virtual_stages=virtual_stages, ep=ep)
    if expert_imbalance < 1:
        raise CollieError(f"{named('expert_imbalance')} is the busiest expert-parallel "
                          f"rank's rows over the mean, at least 1; got {expert_imbalance}")
    spec, opt = get_gpu(gpu), get_optimizer(optimizer)
    variants = update_variants(opt, update_in_backward,
                               two_pass=max_grad_norm is not None and clip_mode == "two-pass")
    seq_len = seq_len if seq_len is not None else default_seq_len(model)
    if virtual_tokens:  # the data's sequences are shorter than what the model runs
        cfg = load_config(model)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions",
                                                                         None)
        if limit and seq_len + virtual_tokens > limit:
            raise CollieError(f"{named('seq_len')} {seq_len} and the prompt's {virtual_tokens} "
                              f"virtual tokens make {seq_len + virtual_tokens} positions, past "
                              f"the model's {limit}; use {named('seq_len')} at most "
                              f"{limit - virtual_tokens}")
    prof = replace(profile_model(model, seq_len=seq_len + virtual_tokens, dtype=dtype),
                   tp_refusal=tp_refusal)
    if global_batch_size is None:  # ~2M tokens, a multiple of the GPUs: any dp divides it
        global_batch_size = -(-max(1, (1 << 21) // seq_len) // gpus) * gpus
    pins = {k: v for k, v in asdict(asked).items() if k != "recompute"}
    outers = _outer_space(prof, gpus, gpus_per_node, global_batch_size, pins, tuple(variants),
                          stateless=opt.state_bytes == 0 and not opt.factored)
    modes = (recompute,) if recompute else RECOMPUTE
    capacity = spec.memory_bytes * (1 - memory_reserve)
    solver, solver_name = _solver()
    lora = None if lora_rank is None else lora_cost(prof, lora_rank, lora_targets,
                                                    dora=lora_dora)
    fraction = (lora.params if lora else prof.num_params) / prof.num_params
    mms = {ib: MemoryModel(prof, o, fraction, lora, expanded_kv=not spec.fused_gqa(dtype),
                           expert_imbalance=expert_imbalance)
           for ib, o in variants.items()}
    mm = next(iter(mms.values()))

    problems = [_problem(o.layout, prof, spec, variants[o.in_backward], mms[o.in_backward],
                         modes, capacity, gpus_per_node, o.in_backward, expert_imbalance)
                for o in outers]
    order = sorted(range(len(problems)), key=lambda i: (problems[i].lower_bound(),
                                                        outers[i].key()))
    solved: list[tuple[float, Candidate]] = []
    closest: tuple[int, Problem] | None = None
    unconstrained: dict[tuple, list[dict[str, int]]] = {}  # layout -> its fastest split
    for i in order:
        prob = problems[i]
        if len(solved) > top_k and prob.lower_bound() >= solved[top_k][0]:
            break  # nothing left can enter the top k+1
        short = prob.min_peak() - capacity
        if short > 0:
            if closest is None or short < closest[0]:
                closest = (short, prob)
            continue
        layout = outers[i].key()[:-1]
        counts = unconstrained.get(layout) if prob.in_backward else None
        if counts is None or not prob.fits(counts) or prob.time[0].passes > 1:
            cutoff = solved[top_k][0] if len(solved) > top_k else None
            counts = solve_ilp(prob, solver, cutoff) if solver else solve_brute(prob)
        # else: the same layout updating after backward is optimal without any recompute
        # it can avoid; inside backward it takes the same time with less memory: no ILP
        if counts is None:
            continue
        if not prob.in_backward and _fastest_only(prob, counts):
            unconstrained[layout] = counts
        t = prob.objective(counts)
        solved.append((t, _candidate(prob, counts, prof, spec, global_batch_size, gpus)))
        solved.sort(key=lambda x: x[0])
        if quick:
            break
    elapsed = time.perf_counter() - start

    base = dict(model=prof.name, gpus=gpus, gpu=spec.name, gpus_per_node=gpus_per_node,
                seq_len=seq_len, global_batch_size=global_batch_size, optimizer=opt.name,
                dtype=dtype, lora_rank=lora_rank, solver=solver_name,
                lora_targets=None if lora_rank is None else canonical_lora_targets(lora_targets),
                usable_memory_bytes=int(capacity), max_grad_norm=max_grad_norm,
                clip_mode=clip_mode, num_params=prof.num_params,
                virtual_tokens=virtual_tokens, lora_dora=lora_dora)
    update_flags = dict(update_in_backward=update_in_backward, max_grad_norm=max_grad_norm,
                        clip_mode=clip_mode)
    notes = [] if solver else ["no ILP solver available: solved by exhaustive enumeration"]
    if mm.expanded_kv and prof.act_expanded_kv.sharded:
        extra = prof.act_expanded_kv.sharded / 2**20
        notes.append(f"{spec.name} has no fused grouped-query attention kernel in {dtype}: "
                     f"K/V are expanded to every head, {extra:.1f} MiB more per layer and "
                     "sequence without recomputation (priced)")
    if tp_refusal and tp != 1:
        notes.append(tp_refusal)
    if not solved:
        if closest is None:
            raise CollieError("no layout to try: every (dp, tp, pp) split was ruled out "
                              "by the pins or the model's head count")
        short, prob = closest
        frugal = prob.memory[0].frugal_mode(prob.modes)
        counts = [{frugal: n} for n in even_split(prob.layers, prob.stages)]
        near = _candidate(prob, counts, prof, spec, global_batch_size, gpus, fits=False)
        return Plan(**base, feasible=False, solve_time_s=round(elapsed, 3), chosen=near,
                    shortfall_bytes=int(short),
                    suggestions=[] if quick else _suggestions(
                        model, gpus, spec, opt, dtype, seq_len, global_batch_size, recompute,
                        gpus_per_node, memory_reserve, lora_rank, lora_targets, pins,
                        update_flags),
                    notes=notes)
    # On a tie (the model's precision) update after backward: the familiar way, and it
    # keeps gradients for the user to read
    tie = next((i for i, (t, c) in enumerate(solved)
                if not c.update_in_backward and t <= solved[0][0] * 1.0005), 0)
    solved.insert(0, solved.pop(tie))
    best = solved[0][1]
    if best.tp > 1:
        notes += _shard(best, prof, spec)
    if prof.num_experts:
        notes.append(f"experts: ep={ep}, pinned" if ep is not None else
                     _ep_note(best, [c for _, c in solved[1:]], expert_imbalance))
    if len(variants) > 1:
        notes.append(_update_note(best, [c for _, c in solved[1:]],
                                  variants[True].backward_passes > 1))
    alternatives = []
    for _, cand in solved[1:top_k + 1]:
        cand.why_not = _why_not(cand, best)
        alternatives.append(cand)
    return Plan(**base, feasible=True, solve_time_s=round(elapsed, 3), chosen=best,
                alternatives=alternatives, notes=notes)


def _fastest_only(prob: Problem, counts: list[dict[str, int]]) -> bool:
    """Whether every block runs in the fastest mode allowed: no memory bound is binding."""
    fastest = min(prob.modes, key=lambda c: prob.time[0].per_block[c])
    return all(n == 0 for stage in counts for c, n in stage.items() if c != fastest)


def update_variants(opt: OptimizerSpec, pinned: bool | None, two_pass: bool
                    ) -> dict[bool, OptimizerSpec]:
    """Where ``opt`` may update, keyed by "inside backward", as the cost model prices it."""
    if opt.fused_backward:  # LOMO, AdaLomo: always inside
        if pinned is False:
            raise CollieError(f"{opt.name} updates inside backward by design; "
                              "update_in_backward=False applies to lion, adamw, adam, adan")
        return {True: opt.in_backward(two_pass)}
    if not opt.in_backward_rule:
        if pinned:
            opt.in_backward()  # raises: says which rules can
        return {False: opt}
    if pinned is None:
        return {False: opt, True: opt.in_backward(two_pass)}
    return {pinned: opt.in_backward(two_pass) if pinned else opt}


def _ep_note(best: Candidate, others: list[Candidate], imbalance: float) -> str:
    """Why the plan splits the routed experts as it does, against the best plan solved
    with another ep."""
    other = next((c for c in others if c.ep != best.ep), None)
    cost = (f"four all-to-alls a layer (six recomputed) and the busiest rank's "
            f"{imbalance:g}x rows (--expert-imbalance)")
    if other is None:
        return (f"experts: ep={best.ep}; no plan with another ep came close "
                f"(ep > 1 costs {cost})")
    ratio = other.step_time_s / best.step_time_s
    gib = (other.memory_per_gpu_bytes - best.memory_per_gpu_bytes) / 2**30
    if best.ep == 1:
        return (f"experts: ep=1 (each rank runs every expert on its own tokens); splitting "
                f"them (ep={other.ep}) is {ratio:.3f}x slower: {cost}, "
                f"{-gib:.1f} GiB less per GPU")
    return (f"experts: split over ep={best.ep} ranks, {gib:.1f} GiB less per GPU than "
            f"ep={other.ep}, which is {ratio:.3f}x slower; ep costs {cost}")


def _update_note(best: Candidate, others: list[Candidate], two_pass: bool) -> str:
    """Why the plan updates where it does, against the best of the other kind solved."""
    other = next((c for c in others if c.update_in_backward != best.update_in_backward),
                 None)
    gib = 2**30
    if best.update_in_backward:
        why = ("updating after backward, the best plan is "
               f"{other.step_time_s / best.step_time_s:.3f}x slower" if other else
               "no plan updating after backward fits or comes close")
        return f"updates inside backward (no gradient buffer at the peak): {why}"
    if other is None:
        return "updates after backward: no plan updating inside backward comes close"
    ratio = other.step_time_s / best.step_time_s
    if ratio >= 1.0005:
        return (f"updates after backward: updating inside backward is {ratio:.3f}x slower"
                + (" (two-pass clipping runs forward and backward twice)" if two_pass else ""))
    saved = (best.memory_per_gpu_bytes - other.memory_per_gpu_bytes) / gib
    if saved < 0.01:
        return ("updates after backward: updating inside backward would save nothing here"
                + (f" (gradients accumulate over {best.num_microbatches} micro-batches)"
                   if best.num_microbatches > 1 else ""))
    return (f"updates after backward; updating inside backward is as fast and needs "
            f"{saved:.2f} GiB less per GPU: pass --update-in-backward "
            "(update_in_backward=True) to choose it")


def _outer_space(prof: ModelProfile, gpus: int, gpus_per_node: int, global_batch: int,
                 pins: dict, in_backward: tuple[bool, ...] = (False,),
                 stateless: bool = False) -> list[Outer]:
    """Every (dp, tp, pp, zero, micro-batch, schedule, where the update runs) that
    matches the pins and can run; when none can, the error says which rule each pinned
    choice breaks. A rule with no state (LOMO) updating inside backward has nothing for
    ZeRO-1 to shard: it runs, and is planned, as ZeRO-0 (a plan line said zero=1)."""
    out, reasons = [], {}
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for zero, ep in itertools.product(_zero_stages(dp, pins.get("zero")),
                                              _expert_sizes(prof, dp, tp, gpus_per_node,
                                                            pins.get("ep"))):
                for b in ((pins["micro_batch_size"],) if pins.get("micro_batch_size")
                          else MICRO_BATCH_SIZES):
                    for sched in _schedules(pp, pins.get("schedule")):
                        v = (pins.get("virtual_stages") or INTERLEAVED_CHUNKS
                             if sched == "interleaved" and pp > 1 else 1)
                        lay = Layout(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch_size=b,
                                     seq_len=prof.seq_len, num_microbatches=max(
                                         1, global_batch // (dp * b)), schedule=sched,
                                     virtual_stages=v, ep=ep)
                        if any(val is not None and getattr(lay, k) != val
                               for k, val in pins.items()):
                            continue
                        for ib in in_backward:
                            why = layout_problem(lay, prof, gpus_per_node, global_batch, ib)
                            if why:  # one example of each rule broken, and how often
                                n, first = reasons.get(why[0], (0, why[1]))
                                reasons[why[0]] = (n + 1, first)
                            elif ib and stateless and lay.zero == 1 and pins.get("zero") is None:
                                out.append(Outer(replace(lay, zero=0), ib))
                            else:
                                out.append(Outer(lay, ib))
    if not out:
        pinned = ", ".join(f"{k}={v}" for k, v in pins.items() if v is not None)
        if reasons:  # the rules the pinned layouts break, most common first
            why = "; ".join(msg for _, msg in sorted(reasons.values(), key=lambda r: -r[0]))
        else:  # no split of the GPUs matches the pinned sizes
            bad = [f"{k}={pins[k]} does not divide {gpus} GPUs" for k in ("dp", "tp", "pp")
                   if pins.get(k) and gpus % pins[k]]
            why = "; ".join(bad) or f"dp*tp*pp must equal {gpus}"
        raise CollieError(f"no layout of {gpus} GPUs with global batch {global_batch} "
                          f"satisfies {pinned or 'the model'}: {why}")
    return out


def _expert_sizes(prof: ModelProfile, dp: int, tp: int, gpus_per_node: int,
                  pinned: int | None) -> tuple[int, ...]:
    """The ep sizes to try: a pin as it is (layout_problem says what it breaks); for a
    mixture of experts, every ep dividing dp and the expert count whose group stays
    inside a node (all-to-all over the slower links only where pinned); else 1."""
    if pinned is not None:
        return (pinned,)
    return tuple(e for e in divisors(dp) if prof.num_experts % e == 0
                 and e * tp <= gpus_per_node) if prof.num_experts else (1,)


def _zero_stages(dp: int, pinned: int | None) -> tuple[int, ...]:
    """ZeRO-1 moves the same bytes as plain DP and keeps less: ZeRO-0 only if pinned."""
    if pinned is not None:
        return (pinned,)
    return (0,) if dp == 1 else (1, 2, 3)


def _schedules(pp: int, pinned: str | None) -> tuple[str, ...]:
    """GPipe takes the time of 1F1B and more memory in this model: tried only if pinned."""
    if pinned:
        return (pinned,)
    return ("1f1b",) if pp == 1 else ("1f1b", "interleaved")


def _problem(lay: Layout, prof: ModelProfile, spec: GPUSpec, opt: OptimizerSpec,
             mm: MemoryModel, modes: tuple[str, ...], capacity: float,
             gpus_per_node: int, in_backward: bool = False,
             imbalance: float = EXPERT_IMBALANCE) -> Problem:
    memory, times = [], []
    for k in range(lay.pp):
        emb, head = k == 0, k == lay.pp - 1
        memory.append(mm.stage_terms(lay, k, emb, head))
        params = (mm.end_params_per_rank(lay.tp, emb, head), mm.block_params_per_rank(lay.tp))
        times.append(stage_time(prof, spec, opt, lay, emb, head, gpus_per_node, params,
                                mm.trainable_fraction, imbalance))
    return Problem(lay, prof.num_layers, modes, memory, times, capacity, in_backward)


def _candidate(prob: Problem, counts: list[dict[str, int]], prof: ModelProfile,
               spec: GPUSpec, global_batch: int, gpus: int, fits: bool = True) -> Candidate:
    lay = prob.layout
    t = prob.objective(counts)
    recompute, stages, first = [], [], 0
    for n in counts:
        size = sum(n.values())
        stages.append([first, first + size - 1])
        first += size
        for c in RECOMPUTE:  # within a stage the order does not change memory or time
            recompute += [c] * n.get(c, 0)
    mems = [m.breakdown(n, k) for k, (m, n) in enumerate(zip(prob.memory, counts))]
    tokens = global_batch * prof.seq_len
    mfu = model_flops_per_step(prof, global_batch) / (t * gpus * spec.peak_flops(prof.dtype))
    return Candidate(dp=lay.dp, tp=lay.tp, pp=lay.pp, zero=lay.zero, ep=lay.ep,
                     micro_batch_size=lay.micro_batch_size,
                     num_microbatches=lay.num_microbatches, schedule=lay.schedule,
                     virtual_stages=lay.virtual_stages, recompute=recompute, stages=stages,
                     memory_per_gpu_bytes=max(m.total_bytes for m in mems),
                     step_time_s=round(t, 6), tokens_per_gpu_per_s=round(tokens / t / gpus, 2),
                     mfu=round(mfu, 4), memory=[{**m.to_dict(), "moment": m.moment}
                                                for m in mems], fits=fits,
                     update_in_backward=prob.in_backward)


def _shard(cand: Candidate, prof: ModelProfile, spec: GPUSpec) -> list[str]:
    """Solve the block's per-op sharding for the chosen tp; say if it departs from the
    column/row layout the block costs above assume."""
    layout = linear_layout(prof, solve_block_sharding(prof, cand.tp, spec,
                                                      cand.micro_batch_size))
    cand.sharding = layout
    # a mixture of experts' sublayer is replicated under tp: not the ILP's to split
    whole = {n["module"] for n in prof.block_graph if n.get("replicated")}
    megatron = {n["module"]: "column" if n["sharded"] else "row"
                for n in prof.block_graph if n["kind"] == "linear" and n["module"] not in whole}
    if {k: v for k, v in layout.items() if k not in whole} == megatron:
        return []
    return ["the per-op sharding ILP prefers a layout other than column/row for some "
            "linears (see sharding); step time and memory are priced for column/row"]


def _why_not(cand: Candidate, best: Candidate) -> str:
    ratio = cand.step_time_s / best.step_time_s
    if ratio < 1.0005:  # a tie to the model's precision: say so, not "1.000x slower"
        return "as fast as the chosen plan (modeled step times within 0.05%)"
    reasons = []
    if cand.pp > 1 and cand.num_microbatches < 4 * cand.pp:
        bubble = (cand.pp - 1) / (cand.num_microbatches + cand.pp - 1)
        reasons.append(f"pipeline bubble {100 * bubble:.0f}%")
    recomputed = sum(r != "none" for r in cand.recompute)
    if recomputed > sum(r != "none" for r in best.recompute):
        reasons.append(f"recomputes {recomputed} layers")
    if cand.tp > best.tp:
        reasons.append(f"more tensor-parallel traffic (tp={cand.tp})")
    if cand.zero == 3 and best.zero != 3:
        reasons.append("ZeRO-3 gathers weights every micro-batch")
    if cand.dp > best.dp and cand.zero < 3:
        reasons.append(f"larger gradient all-reduce exposure (dp={cand.dp})")
    if cand.update_in_backward and not best.update_in_backward:
        reasons.append("updates inside backward")
    elif best.update_in_backward and not cand.update_in_backward:
        reasons.append("updates after backward (holds every gradient)")
    why = "; ".join(reasons) or "higher modeled step time"
    return f"{ratio:.3f}x slower: {why}"


def _suggestions(model: str, gpus: int, spec: GPUSpec, opt: OptimizerSpec, dtype: str,
                 seq_len: int, global_batch: int, recompute: str | None, gpus_per_node: int,
                 memory_reserve: float, lora_rank: int | None,
                 lora_targets: str | list[str] | None, pins: dict, update: dict
                 ) -> list[str]:
    """What would make an infeasible request fit, each one change from the request (its
    pins and ``update`` flags kept) checked with the cost model."""
    out = []

    def fits(**kw: object) -> bool:
        args = dict(model=model, gpus=gpus, gpu=spec, gpus_per_node=gpus_per_node,
                    seq_len=seq_len, global_batch_size=global_batch, optimizer=opt.name,
                    dtype=dtype, recompute=recompute, memory_reserve=memory_reserve, top_k=0,
                    quick=True, lora_rank=lora_rank, lora_targets=lora_targets, **pins,
                    **update)
        args.update(kw)
        try:
            return plan(**args).feasible
        except CollieError:
            return False

    pinned = [k for k, v in pins.items() if v is not None]
    if pinned and fits(**dict.fromkeys(pinned)):
        flags = " ".join(flag(k) for k in pinned)
        out.append(f"drop the pins ({flags}): the planner's own choice fits")
    for factor in (2, 4, 8, 16):
        more = max(global_batch, gpus * factor)
        if fits(gpus=gpus * factor, global_batch_size=more, dp=None):  # dp grows with them
            out.append(f"use {gpus * factor} GPUs" + (
                f" (global batch {more}, one sequence per GPU)" if more > global_batch
                else ""))
            break
    if opt.in_backward_rule and not update["update_in_backward"] and fits(
            update_in_backward=True):
        out.append("update inside backward (--update-in-backward: no gradients kept)")
    for name in ("lomo", "adalomo"):
        if opt.name != name and fits(optimizer=name, update_in_backward=None):
            out.append(f"use --optimizer {name} (no gradients or states kept)")
            break
    if recompute not in (None, "full") and fits(recompute="full"):
        out.append("allow recomputation (--recompute full)")
    if seq_len > 512 and fits(seq_len=seq_len // 2):
        out.append(f"shorter sequences (--seq-len {seq_len // 2})")
    if lora_rank is None and fits(lora_rank=8):
        out.append("train LoRA adapters only (--lora-rank 8: the frozen base keeps no "
                   "gradients or states)")
    return out
