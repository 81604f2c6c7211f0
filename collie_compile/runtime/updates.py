"""How a rank's weights are updated: a torch optimizer stepping after backward (sharded by
ZeRO-1 where the plan says so), or an engine updating each weight inside backward (under
ZeRO-1 each weight by one data-parallel rank, which keeps its states and then sends it to
the others)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from collie_compile.dtypes import torch_dtype
from collie_compile.errors import CollieError
from collie_compile.optim.in_backward import STATE_KEYS, FusedBackward
from collie_compile.optim.optimizers import DEFAULTS, optimizer_class, optimizer_options
from collie_compile.optim.specs import get_optimizer
from collie_compile.planner.result import Plan
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime.options import FusedOptions
from collie_compile.runtime.program import RankProgram


@dataclass
class Updates:
    """The optimizer of a rank program: ``optimizer`` after backward, or ``fused`` inside
    it, under the rule ``rule``."""

    rule: str
    optimizer: torch.optim.Optimizer | None = None
    fused: FusedBackward | None = None

    def inner(self) -> torch.optim.Optimizer:
        """The torch optimizer holding the states (a ZeroRedundancyOptimizer's own)."""
        return getattr(self.optimizer, "optim", self.optimizer)

    def states(self, program: RankProgram) -> dict[str, dict]:
        """This rank's optimizer state by parameter name."""
        if self.fused is not None:
            return self.fused.state
        by_id = {id(p): n for n, p in program.local_parameters().items()}
        return {by_id[id(p)]: st for p, st in self.inner().state.items()}

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        if self.fused is not None:
            return self.fused.lr
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        """Use ``lr`` from the next update on (every parameter group)."""
        if not lr >= 0:
            raise CollieError(f"the learning rate must be a number >= 0, got {lr}")
        if self.fused is not None:
            self.fused.lr = lr
            return
        # a ZeroRedundancyOptimizer copies its groups into its inner optimizer each step;
        # setting both keeps them equal in between, too
        for opt in {id(o): o for o in (self.optimizer, self.inner())}.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def hyperparameters(self) -> dict:
        """The rule's settings a checkpoint records beside its states (not the learning
        rate, which schedules move): JSON values."""
        if self.fused is not None:
            found = {"weight_decay": self.fused.weight_decay, **self.fused.options}
        else:
            found = {k: v for k, v in self.inner().param_groups[0].items()
                     if k not in ("params", "lr", "initial_lr")}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(found.items())
                if isinstance(v, (bool, int, float, str, tuple, type(None)))}

    def writes_states(self, program: RankProgram) -> bool:
        """False under ZeRO-1 (stateful rules), where each state lives on one dp rank."""
        c = program.chosen
        stateless = self.fused is not None and self.rule not in STATE_KEYS
        return stateless or not (c.zero == 1 and c.dp > 1)


def in_backward(optimizer: str, plan: Plan | None = None) -> bool:
    """Whether ``optimizer`` updates each weight inside backward under ``plan``: LOMO and
    AdaLomo always, the others where the plan says so (raises for unknown names)."""
    spec = get_optimizer(optimizer)
    return spec.fused_backward or bool(plan and plan.update_in_backward)


def make_updates(program: RankProgram, optimizer: str, lr: float | None, kwargs: dict,
                 options: FusedOptions, inside: bool = False) -> Updates:
    """The optimizer of ``program``'s trainable parameters, inside backward or not."""
    rule = optimizer.lower()
    cdist.agree(lambda: _refuse_nothing_to_train(program, inside))
    c = program.chosen
    if c.zero == 1 and c.dp > 1 and program.ep_shards:  # a plan made by hand
        raise CollieError(f"ZeRO-1 keeps each weight's optimizer states on one dp rank, and "
                          f"under ep={c.ep} the dp ranks hold different experts; use zero 0, "
                          "2 or 3")
    if not inside:
        return Updates(rule, optimizer=_torch_optimizer(program, rule, lr, kwargs))
    cdist.agree(lambda: _refuse_split_ties(program, rule))
    return Updates(rule, fused=_fused(program, rule, lr, kwargs, options))


def _refuse_nothing_to_train(program: RankProgram, inside: bool) -> None:
    """A rank whose stages hold no weight at all (pp cut a family whose layers the block
    outline does not follow, LongCat-Flash's): its outline is wrong. One whose weights
    are all frozen (the adapters on other stages: a prompt, LoRA on the first layers)
    runs backward for the stages before it and updates nothing, after backward; an
    update inside backward or by ZeRO-1's owners is not built for it."""
    c = program.chosen
    held = [p for st in program.stages for p in st.parameters()]
    if not held:
        raise CollieError(f"pipeline stage {program.stage_ids} of pp={c.pp} holds no weight "
                          f"of {program.plan.model}: its blocks are not cut as the model "
                          "runs them; use a smaller pp (pp=1 works)")
    if not any(p.requires_grad for p in held) and (inside or (c.zero == 1 and c.dp > 1)):
        how = "inside backward" if inside else "by ZeRO-1's owners"
        raise CollieError(f"pipeline stage {program.stage_ids} of pp={c.pp} holds no "
                          f"trainable weight (the adapters are on other stages), and its "
                          f"update {how} is not built for that: update after backward "
                          "(zero 0, 2 or 3), or use a smaller pp")


def _torch_optimizer(program: RankProgram, name: str, lr: float | None, kwargs: dict
                     ) -> torch.optim.Optimizer:
    params = [p for st in program.stages for p in st.parameters() if p.requires_grad]
    # a stage whose weights are all frozen steps an empty group (torch refuses no group)
    cls = optimizer_class(name, params[0].dtype if params else torch_dtype(program.plan.dtype))
    # the class's own options (a typo raised a raw TypeError from its constructor)
    signature = inspect.signature(cls.__init__).parameters
    allowed = set(signature) - {"self", "params", "lr"}
    unknown = set(kwargs) - allowed
    if unknown and all(p.kind != p.VAR_KEYWORD for p in signature.values()):
        raise CollieError(f"{name} takes {', '.join(sorted(allowed))} in optimizer_kwargs, "
                          f"not {', '.join(sorted(unknown))}")
    opts = optimizer_options(name, lr, kwargs)
    c = program.chosen
    if c.zero == 1 and c.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=cls,
                                       process_group=program.mesh.get_group("dp"), **opts)
    return cls(params or [{"params": []}], **opts)


def _refuse_split_ties(program: RankProgram, rule: str) -> None:
    """A weight updated inside backward cannot wait for its tied copy's gradient on
    another pipeline stage."""
    if program.tied_stages:
        raise CollieError(f"{rule} updates each weight inside backward, but "
                          f"{min(program.tied_stages)} is tied across pipeline stages "
                          "(embedding and LM head), whose copies must first sum their "
                          "gradients; use pp=1, or an optimizer that steps after backward "
                          "(adamw, lion, ...)")


def _fused(program: RankProgram, rule: str, lr: float | None, kwargs: dict,
           o: FusedOptions) -> FusedBackward:
    """The rule inside backward: after each gradient's dp reduction (the stage's
    GradReducer, or FSDP2's reduce-scatter hooks), with AdaLomo's sharded statistics
    summed over the ranks holding the other slices."""
    from collie_compile.passes.data_parallel import grad_reducers

    allowed = {"weight_decay", *DEFAULTS.get(rule, {})}
    unknown = set(kwargs) - allowed
    if unknown:
        raise CollieError(f"{rule} inside backward takes {', '.join(sorted(allowed))} in "
                          f"optimizer_kwargs, not {', '.join(sorted(unknown))}")
    opts = optimizer_options(rule, lr, kwargs)
    lr, wd = opts.pop("lr"), opts.pop("weight_decay", 0.0)
    params = {n: p for n, p in program.local_parameters().items() if p.requires_grad}
    owner = _zero1_owners(program, params) if rule in STATE_KEYS else {}
    me = program.coords.dp
    engine = FusedBackward(
        params.items(), rule, lr, wd, options=opts,
        owns=lambda n: owner.get(n, me) == me,
        after_update=(lambda: _send_from_owners(program, params, owner)) if owner else None,
        max_grad_norm=o.max_grad_norm,
        clip_mode=o.clip_mode, clip_value=o.clip_value, loss_scaler=o.scaler(),
        stochastic_rounding=o.stochastic_rounding,
        allsum_for=lambda n: _allsum_for(program, n, params[n]),
        partial_group=program.partial_groups.get,
        # One seed everywhere: replicas of a parameter (dp under ZeRO-0, tp peers of a
        # replicated norm) must round it the same way or they drift apart.
        counts_in_norm=lambda n: program.writes(n, params[n]), seed=0)
    fsdp, attached = False, []
    for st in program.stages:
        reducers = grad_reducers(st)
        for reducer in reducers:
            reducer.on_ready = engine.on_final
            # with experts split by ep, updates sum over ep, dp or tp groups from several
            # reducers' and FSDP's hooks: in backward's order, the same on every rank
            reducer.in_order = bool(program.ep_shards)
        reduced = {id(p) for r in reducers for b in r.buckets for p in b}
        mine = [p for p in st.parameters() if p.requires_grad and id(p) not in reduced]
        engine.attach(mine)
        attached += mine
        fsdp = fsdp or hasattr(st, "set_requires_gradient_sync")
    # Under torch.distributed.pipelining an FSDP2 stage syncs gradients once, after
    # the last micro-batch, and runs the hooks then; otherwise FSDP2 reduce-scatters
    # every micro-batch (gradients stay sharded, as the memory model counts them) and
    # runs them each time, as plain autograd does.
    pipelined = program.chosen.pp > 1
    m = program.chosen.num_microbatches
    engine.accumulations = 1 if fsdp and pipelined else m
    # weights FSDP leaves alone (experts split by ep, held by no other rank: not DTensors)
    # get a hook per micro-batch, as under plain autograd
    engine.accumulations_of = {id(p): m for p in attached if not hasattr(p, "placements")}
    return engine


def _zero1_owners(program: RankProgram, params: dict[str, torch.nn.Parameter]
                  ) -> dict[str, int]:
    """ZeRO-1 inside backward: the dp rank that updates each parameter and keeps its
    states, largest parameters first to the least loaded rank (the same on every rank).
    Empty where the plan is not ZeRO-1 over several dp ranks."""
    c = program.chosen
    if not (c.zero == 1 and c.dp > 1):
        return {}
    load, owner = [0] * c.dp, {}
    for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
        r = load.index(min(load))
        owner[name] = r
        load[r] += params[name].numel()
    return owner


def _send_from_owners(program: RankProgram, params: dict[str, torch.nn.Parameter],
                      owner: dict[str, int]) -> None:
    """After the updating backward: each weight from the dp rank that updated it."""
    group = program.mesh.get_group("dp")
    works = [dist.broadcast(p.data, src=dist.get_global_rank(group, owner[n]), group=group,
                            async_op=True) for n, p in params.items()]
    for w in works:
        w.wait()


def _allsum_for(program: RankProgram, name: str, p: torch.Tensor) -> object | None:
    """Sum over the ranks holding the other slices of ``name``: tp (its shard dim), ep
    (a bank of experts, dim 0) and, under FSDP2, dp (dim 0). None for a parameter this
    rank holds whole."""
    splits = []
    shard = program.tp_shards.get(name)
    if shard is not None:
        splits.append((shard.dim, program.mesh.get_group("tp")))
    if name in program.ep_shards:
        splits.append((0, program.ep_group))
    for placement in getattr(p, "placements", ()):
        if placement.is_shard():
            splits.append((placement.dim, program.mesh.get_group("dp")))
    if not splits:
        return None

    def allsum(t: torch.Tensor, dims: tuple[int, ...]) -> None:
        for dim, group in splits:
            if dim in dims:
                dist.all_reduce(t, group=group)
    return allsum
