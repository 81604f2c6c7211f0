"""LoRA as a graph rewrite, composable with tensor and expert parallelism.

Beside every linear whose module matches a ``peft.LoraConfig``'s ``target_modules``
(peft's own matcher decides), the pass adds ``scaling * B(A(dropout(x)))`` with
``A: [r, in]`` and ``B: [out, r]`` registered at ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` (peft's names less the adapter name). Base weights are
frozen. Ranks and alphas follow the config's ``rank_pattern``/``alpha_pattern``.

``target_parameters`` (peft's ParamWrapper; peft >= 0.21 sets them for "all-linear" on a
mixture of experts) adapt a parameter itself: a 2-D weight read by a linear (a router's)
gets the same branch; a bank of experts ``[experts, ...]`` gets ``scaling · B_e A_e x``
beside each grouped product, expert by expert (:func:`expert_branch`; peft's layout, A
``[r·E, in]`` holding expert e's rows e·r …, B ``[out, r·E]`` its columns e, e + E, …),
which is peft's ``(W_e + scaling·B_e A_e) x`` without forming ΔW. Several parameters of
one module nest as in peft: the first targeted is the innermost, at
``<module>.base_layer.lora_A``. Under expert parallelism a rank adds the branches of its
own experts; A and B stay whole on every rank (their gradient rows for other ranks'
experts are zero, so the data-parallel sum over all ranks completes them).

DoRA (``use_dora``) adds peft's magnitude ``m`` (``<module>.lora_magnitude_vector``)
and rescales: ``y + (m/‖W + s·BA‖ - 1)·W x' + (m/‖W + s·BA‖)·s·B A x'``, the norm per
output feature and detached (peft does not differentiate it), ``x'`` the dropped-out
input. Under a row-parallel base the squared norms are summed over tp (the input
features are split), the magnitude is whole and its gradient a partial sum.

AdaLoRA (an ``AdaLoraConfig``) adds peft's SVD form instead: ``A: [r, in]``,
``E: [r, 1]``, ``B: [out, r]`` at ``<module>.lora_A/E/B`` and
``(B((A·E)(x')))·scaling / (r + 1e-5)``; its orthogonality loss and rank allocation run
between steps (:mod:`collie_compile.runtime.adalora`). E follows A: whole, with a partial
gradient under tp.

Run after :mod:`.tensor_parallel` and :mod:`.expert_parallel`; the adapters of linears
follow their base weight:

- column-parallel base: B takes the same output rows, A is whole on every rank; the
  branch reads the base's tp-copied input, so no new collective in forward. A's
  gradient is a partial sum over the tp ranks' output slices (``partial_grads``).
- row-parallel base: A takes the same input columns, B is whole; the branch's partial
  output joins the base's before its all-reduce, so one all-reduce sums both. B's
  gradient is a partial sum over tp (``partial_grads``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx

from collie_compile.capture.annotate import GROUPED_OPS
from collie_compile.errors import CollieError
from collie_compile.models.experts import grouped_linear
from collie_compile.models.prompts import ENCODER

from .expert_parallel import ep_record
from .tensor_parallel import linear_operands, module_node, tp_record

aten = torch.ops.aten
_RECORD = "collie_lora"
_PENDING = "collie_dora_pending"


@dataclass(frozen=True)
class Adapter:
    """What an adapter (``<prefix>.lora_A/B.weight``) adds to: ``scaling``·B·A onto the
    parameter ``weight``; for a bank of ``experts`` (0: a linear's weight), expert by
    expert, the bank stored [experts, in, out] where ``transposed``."""

    weight: str
    scaling: float
    experts: int = 0
    transposed: bool = False


def lora_record(gm: fx.GraphModule) -> dict[str, Adapter]:
    """The adapters :func:`lora` added (prefix -> :class:`Adapter`)."""
    return gm.meta.setdefault(_RECORD, {})


def scaling_of(config: object, key: str) -> tuple[int, float]:
    """(rank, scaling) of the adapter on ``key`` (a module, or a parameter for
    ``target_parameters``), with the config's rank and alpha patterns as peft reads them."""
    from peft.utils.other import get_pattern_key

    r = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern, key), config.r))
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, key),
                                     config.lora_alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


def expert_delta(a: torch.Tensor, b: torch.Tensor, experts: int, transposed: bool,
                 first: int = 0, stop: int | None = None) -> torch.Tensor:
    """ΔW of experts ``first`` to ``stop`` - 1 of a bank, in its own layout ([n, out, in],
    or [n, in, out] where ``transposed``), from peft's factors: ``a`` [r·E, in] holds
    expert e's rows e·r … e·r + r - 1, ``b`` [out, r·E] its columns e, e + E, …"""
    stop = experts if stop is None else stop
    a3 = a.reshape(experts, -1, a.shape[-1])[first:stop]  # [n, r, in]
    b3 = b.reshape(b.shape[0], -1, experts)[..., first:stop].permute(2, 0, 1)  # [n, out, r]
    if transposed:
        return torch.bmm(a3.transpose(1, 2), b3.transpose(1, 2))
    return torch.bmm(b3, a3)


def expert_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                  scaling: float, experts: int, first: int, count: int) -> torch.Tensor:
    """``scaling · B_e A_e x`` for the rows ``x`` of experts ``first`` … ``first + count - 1``
    (expert e's rows end at ``offsets[e - first]``), by two grouped products of rank r:
    the bank's ΔW is never formed (it would be as large as the experts, kept for
    backward in every layer)."""
    a3 = a.reshape(experts, -1, a.shape[-1])[first:first + count]  # [n, r, in]
    b3 = b.reshape(b.shape[0], -1, experts)[..., first:first + count]  # [out, r, n]
    h = grouped_linear(x, a3, offsets, transposed=False)
    return scaling * grouped_linear(h, b3.permute(2, 0, 1), offsets, transposed=False)


def _targets_parameter(config: object, name: str) -> bool:
    """Whether peft's ``target_parameters`` take parameter ``name`` (peft's own rule)."""
    targets = getattr(config, "target_parameters", None) or ()
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _prefix(gm: fx.GraphModule, config: object, name: str) -> str:
    """Where peft puts the adapter of parameter ``name``: its module, and one
    ``.base_layer`` for each parameter of that module wrapped after it."""
    module, _, leaf = name.rpartition(".")
    own = [n for n, _ in gm.get_submodule(module).named_parameters(recurse=False)
           if _targets_parameter(config, f"{module}.{n}")]
    return module + ".base_layer" * (len(own) - 1 - own.index(leaf))


ADAPTER_NAMES = (".lora_A.", ".lora_B.", ".lora_E.", ".lora_magnitude_vector.", ".ia3_l.")


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` is an adapter's (this pass's, :mod:`.ia3`'s or a prompt
    method's module), as peft names them."""
    return name.startswith(f"{ENCODER}.") or any(k in name + "." for k in ADAPTER_NAMES)


def is_svd(config: object) -> bool:
    """Whether ``config`` is AdaLoRA's (SVD-form adapters)."""
    return str(getattr(getattr(config, "peft_type", None), "value", "")) == "ADALORA"


def svd_scaling(config: object) -> tuple[int, float, float]:
    """(rank, scaling, divisor) of AdaLoRA's adapters as peft computes them: every
    adapter starts at ``init_r``; ``lora_alpha`` (or r where it is 0), divided by its
    fp32 ``ranknum + 1e-5``."""
    r = int(config.init_r)
    scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
    return r, scaling, float(torch.tensor(float(r)) + 1e-5)


class DoraNorm(torch.nn.Module):
    """DoRA's ``‖W + scaling·B·A‖`` per output feature, without gradient (peft detaches
    it); summed over ``group`` where it splits the input features (a row-parallel base).
    ``out_dim``: W's output-feature dim (1 for GPT-2's Conv1D, stored [in, out])."""

    def __init__(self, scaling: float, out_dim: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.scaling, self.out_dim, self.group = scaling, out_dim, group

    def forward(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = b @ a
            full = w + self.scaling * (delta.T if self.out_dim else delta)
            if self.group is None:
                return torch.linalg.vector_norm(full, dim=1 - self.out_dim)
            sq = full.pow(2).sum(1 - self.out_dim)
            dist.all_reduce(sq, group=self.group)
            return sq.sqrt()


def init_svd(in_features: int, out_features: int, rank: int, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's AdaLoRA init of A and B: N(0, 0.02) each (E starts at zero)."""
    return (torch.empty(rank, in_features).normal_(0.0, 0.02, generator=gen),
            torch.empty(out_features, rank).normal_(0.0, 0.02, generator=gen))


def init_adapter(in_features: int, out_features: int, rank: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's default init: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B zeros."""
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen)
    return a, torch.zeros(out_features, rank)


def lora(gm: fx.GraphModule, config: object, tp: int = 1,
         init: dict[str, torch.Tensor] | None = None, seed: int = 0, tp_rank: int = 0,
         ep_rank: int = 0, tp_group: dist.ProcessGroup | None = None) -> fx.GraphModule:
    """Insert LoRA branches for ``config`` (a ``peft.LoraConfig``). ``init`` maps adapter
    names (``<module>.lora_A.weight``) to full tensors, e.g. from a saved PEFT adapter;
    missing ones get peft's default init. Adds the adapters' shards and partial
    gradients to the graph's :func:`~collie_compile.passes.tensor_parallel.tp_record`, and
    what each adapter adapts to :func:`lora_record`. ``ep_rank``: this rank's index in
    its expert-parallel group (which experts it holds, :func:`.expert_parallel.ep_record`);
    ``tp_group``: the tp group (DoRA's norms of a row-parallel base are summed over it)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if getattr(config, "lora_bias", False):
        raise CollieError("LoRA biases (lora_bias=True) are not supported; leave them out")
    dora = bool(getattr(config, "use_dora", False))
    svd = is_svd(config)
    if svd and (dora or getattr(config, "target_parameters", None)):
        raise CollieError("AdaLoRA adapts linears' modules only (no use_dora, no "
                          "target_parameters), as in peft")
    if dora and getattr(config, "target_parameters", None):
        raise CollieError("DoRA on parameters (target_parameters) is not built; peft has "
                          "no DoRA for them either: leave use_dora off or the parameters out")
    if getattr(config, "target_parameters", None) and config.lora_dropout:
        raise CollieError("LoRA on parameters (target_parameters) cannot have dropout (peft "
                          "refuses it too: the input is not split from the weight); set "
                          "lora_dropout=0")
    record = tp_record(gm)
    shards, partial = record.shards, record.partial_grads
    adapters: dict[str, str] = {}
    linears: set[str] = set()  # the model's own names, for the error below
    gen = torch.Generator().manual_seed(seed)
    for lin in list(gm.graph.nodes):
        operands = _linear_reading(lin)
        if operands is None:
            continue
        x, w_name, out_dim, bias, cast = operands
        module = w_name.rpartition(".")[0]
        linears.add(module.rpartition(".")[2])
        by_module = check_target_module_exists(config, module)
        by_parameter = _targets_parameter(config, w_name)
        if by_module and by_parameter:
            raise CollieError(f"{w_name} is targeted twice, by target_modules and by "
                              "target_parameters; name it in one of them")
        if not (by_module or by_parameter):
            continue
        key, prefix = (module, module) if by_module else (w_name, _prefix(gm, config, w_name))
        if svd:
            r, scaling, divisor = svd_scaling(config)
        else:
            r, scaling = scaling_of(config, key)
        weight = gm.get_parameter(w_name)
        shard = shards.get(w_name)
        full_out, full_in = weight.shape[out_dim], weight.shape[1 - out_dim]
        if shard is not None:
            full_out, full_in = ((shard.size, full_in) if shard.dim == out_dim
                                 else (full_out, shard.size))
        if svd:
            a_name, b_name = f"{prefix}.lora_A", f"{prefix}.lora_B"
            adapters[_svd_values(gm, prefix, r, (init or {}), weight)] = w_name
            if cast is not None:
                raise CollieError(f"AdaLoRA on {module}: its linear casts the weight "
                                  f"({cast}) first; leave it out of the target modules")
            a_full, b_full = init_svd(full_in, full_out, r, gen)
        else:
            a_full, b_full = init_adapter(full_in, full_out, r, gen)
            a_name, b_name = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        a_full = (init or {}).get(a_name, a_full)
        b_full = (init or {}).get(b_name, b_full)
        if tuple(a_full.shape) != (r, full_in) or tuple(b_full.shape) != (full_out, r):
            raise CollieError(f"adapter for {prefix} has shapes {list(a_full.shape)} / "
                              f"{list(b_full.shape)}, expected [{r}, {full_in}] / "
                              f"[{full_out}, {r}]: is it for this model and rank?")
        a, b = a_full, b_full
        everyone = [list(range(tp))]
        if shard is not None and shard.dim == out_dim:  # column-parallel base
            shards[b_name] = shard.along(0)
            b = shards[b_name].take(b_full, tp_rank)
            partial[a_name] = everyone
        elif shard is not None:  # row-parallel base
            shards[a_name] = shard.along(1)
            a = shards[a_name].take(a_full, tp_rank)
            partial[b_name] = everyone
        _add_factors(gm, prefix, a, b, weight, bare=svd)
        if svd:  # E scales A's rows: its gradient sums over the slices tp splits
            if shard is not None:
                partial[f"{prefix}.lora_E"] = everyone
            _insert_branch(gm, lin, x, a_name, b_name, scaling, float(config.lora_dropout),
                           values=f"{prefix}.lora_E", divisor=divisor)
        elif dora:
            row_group = tp_group if shard is not None and shard.dim != out_dim else None
            m_name = _add_magnitude(gm, prefix, w_name, out_dim, scaling, (init or {}),
                                    full_out, shard if row_group is None else None,
                                    tp_rank, row_group)
            if row_group is not None:
                partial[m_name] = everyone
            elif shard is not None:
                shards[m_name] = shard.along(0)
            adapters[m_name] = w_name
            if cast is not None:
                raise CollieError(f"DoRA on {module}: its linear casts the weight "
                                  f"({cast}) first, which the DoRA branch does not follow; "
                                  "leave it out of the target modules")
            _insert_dora(gm, lin, x, w_name, out_dim, bias, a_name, b_name, m_name, scaling,
                         float(config.lora_dropout), DoraNorm(scaling, out_dim, row_group))
        else:
            _insert_branch(gm, lin, x, a_name, b_name, scaling, float(config.lora_dropout),
                           cast)
        adapters[a_name] = adapters[b_name] = w_name
        lora_record(gm)[prefix] = Adapter(w_name, scaling / divisor if svd else scaling)
    for w_name in _expert_banks(gm, config):
        a_name, b_name = _adapt_experts(gm, config, w_name, init or {}, gen, ep_rank)
        adapters[a_name] = adapters[b_name] = w_name
    return finish_adapters(gm, config, adapters, init or {}, linears)


def finish_adapters(gm: fx.GraphModule, config: object, adapters: dict[str, str],
                    init: dict[str, torch.Tensor], linears: set[str]) -> fx.GraphModule:
    """An adapter pass's end: refuse a config that adapted nothing or missed what peft
    adapts (:func:`refuse_missed`), train ``adapters`` (name -> the weight each adapts)
    alone, and recompile."""
    if not adapters:
        raise CollieError(f"no linear matches target_modules={config.target_modules!r}; "
                          f"this model's linears are {', '.join(sorted(linears))}")
    refuse_missed(gm, config, set(adapters.values()), set(init) - set(adapters))
    for name, p in gm.named_parameters():
        p.requires_grad_(name in adapters)
    gm.graph.lint()
    gm.recompile()
    return gm


def _add_factors(gm: fx.GraphModule, prefix: str, a: torch.Tensor, b: torch.Tensor,
                 weight: torch.Tensor, bare: bool = False) -> None:
    """Register A and B at ``<prefix>.lora_A/B.weight`` (``bare``: at
    ``<prefix>.lora_A/B``, AdaLoRA's names) in ``weight``'s dtype; ``weight`` frozen. (A
    base on the meta device is read from a checkpoint later; the adapters it has no copy
    of keep this init.)"""
    device = "cpu" if weight.is_meta else weight.device
    mod = gm
    for part in prefix.split("."):
        if not hasattr(mod, part):  # a nested wrapper's .base_layer
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    for name, t in (("lora_A", a), ("lora_B", b)):
        p = torch.nn.Parameter(t.to(weight.dtype).to(device).clone())
        if bare:
            mod.register_parameter(name, p)
            continue
        holder = torch.nn.Module()
        holder.weight = p
        mod.add_module(name, holder)
    weight.requires_grad_(False)


def _svd_values(gm: fx.GraphModule, prefix: str, r: int, init: dict[str, torch.Tensor],
                weight: torch.Tensor) -> str:
    """Register AdaLoRA's E at ``<prefix>.lora_E`` ([r, 1], whole on every rank): given
    in ``init``, else zero as peft starts it. Returns its name."""
    name = f"{prefix}.lora_E"
    e = init.get(name, torch.zeros(r, 1))
    if tuple(e.shape) != (r, 1):
        raise CollieError(f"AdaLoRA's {name} has shape {list(e.shape)}, expected [{r}, 1]: "
                          "an adapter whose ranks were already allocated (rank_pattern) "
                          "cannot continue here; give the adapter before its allocation, "
                          "or train it afresh")
    device = "cpu" if weight.is_meta else weight.device
    gm.get_submodule(prefix).register_parameter(
        "lora_E", torch.nn.Parameter(e.to(weight.dtype).to(device).clone()))
    return name


def _add_magnitude(gm: fx.GraphModule, prefix: str, w_name: str, out_dim: int,
                   scaling: float, init: dict[str, torch.Tensor], full_out: int,
                   column: object | None, tp_rank: int,
                   row_group: dist.ProcessGroup | None) -> str:
    """Register DoRA's magnitude at ``<prefix>.lora_magnitude_vector``: given in
    ``init`` (whole), else peft's init, the norm of each output feature's weights (B is 0:
    ‖W‖; summed over ``row_group``), which :func:`start_magnitudes` computes once a base
    on the meta device is read. ``column``: the base's column-parallel shard, whose rows
    this rank takes. Returns its name."""
    name = f"{prefix}.lora_magnitude_vector"
    weight = gm.get_parameter(w_name)
    m = init.get(name)
    if m is None and weight.is_meta:  # read later: started by start_magnitudes
        m = torch.full((weight.shape[out_dim],), float("nan"))
        gm.meta.setdefault(_PENDING, {})[name] = (w_name, DoraNorm(0.0, out_dim, row_group))
    elif m is None:
        m = DoraNorm(0.0, out_dim, row_group)(weight.detach(), torch.zeros(1, 1),
                                              torch.zeros(1, 1))
    else:
        if tuple(m.shape) != (full_out,):
            raise CollieError(f"DoRA magnitude {name} has shape {list(m.shape)}, expected "
                              f"[{full_out}]: is the adapter for this model?")
        if column is not None:
            m = column.along(0).take(m, tp_rank)
    device = "cpu" if weight.is_meta else weight.device
    gm.get_submodule(prefix).register_parameter(
        "lora_magnitude_vector",
        torch.nn.Parameter(m.detach().to(weight.dtype).to(device).clone()))
    return name


def pending_magnitudes(gm: fx.GraphModule) -> dict[str, tuple[str, DoraNorm]]:
    """DoRA magnitudes :func:`lora` could not start (their base on the meta device):
    name -> (base weight, its norm)."""
    return gm.meta.get(_PENDING, {})


def start_magnitudes(gm: fx.GraphModule, pending: dict[str, tuple[str, DoraNorm]]) -> None:
    """Start the ``pending`` magnitudes ``gm`` holds at their weights' norms, now that
    the weights are read (peft's init: ‖W‖ per output feature). A collective over the tp
    group where a norm is summed over it: every tp rank of the stage calls it."""
    params = dict(gm.named_parameters())
    with torch.no_grad():
        for name, (w_name, norm) in pending.items():
            if name in params:
                zero = torch.zeros(1, 1, dtype=params[w_name].dtype,
                                   device=params[w_name].device)
                params[name].copy_(norm(params[w_name], zero, zero))


def _expert_banks(gm: fx.GraphModule, config: object) -> list[str]:
    """The [experts, ...] parameters ``target_parameters`` take."""
    return [n for n, p in gm.named_parameters() if p.dim() == 3
            and _targets_parameter(config, n)]


def _adapt_experts(gm: fx.GraphModule, config: object, w_name: str,
                   init: dict[str, torch.Tensor], gen: torch.Generator, ep_rank: int
                   ) -> tuple[str, str]:
    """Add ``scaling · B_e A_e x`` to each grouped product of the bank ``w_name`` (this
    rank's experts); returns the adapter's names."""
    weight = gm.get_parameter(w_name)
    shard = ep_record(gm).get(w_name)
    experts = shard.size if shard is not None else weight.shape[0]
    first = shard.ranges[ep_rank][0][0] if shard is not None else 0
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == w_name]
    users = [u for n in reads for u in n.users]
    # stored [experts, out, in] where the graph transposes it before the grouped product
    transposed = not any(u.target == aten.transpose.int for u in users)
    products = [u for u in users + [v for u in users for v in u.users]
                if str(u.target) in GROUPED_OPS and u.args[1] in (*reads, *users)]
    if not products:
        raise CollieError(f"LoRA on {w_name} cannot be built here: the graph does not read "
                          "it as a grouped product of experts; leave it out of "
                          "target_parameters")
    out_dim, in_dim = (2, 1) if transposed else (1, 2)
    prefix = _prefix(gm, config, w_name)
    r, scaling = scaling_of(config, w_name)
    a_full = torch.empty(r * experts, weight.shape[in_dim]).uniform_(
        -1 / math.sqrt(weight.shape[in_dim]), 1 / math.sqrt(weight.shape[in_dim]),
        generator=gen)  # peft's init of the experts' A: nn.Linear's kaiming, as for linears
    b_full = torch.zeros(weight.shape[out_dim], r * experts)
    a_name, b_name = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    a_full, b_full = init.get(a_name, a_full), init.get(b_name, b_full)
    want = ((r * experts, weight.shape[in_dim]), (weight.shape[out_dim], r * experts))
    if (tuple(a_full.shape), tuple(b_full.shape)) != want:
        raise CollieError(f"adapter for {prefix} has shapes {list(a_full.shape)} / "
                          f"{list(b_full.shape)}, expected {list(want[0])} / "
                          f"{list(want[1])}: is it for this model?")
    _add_factors(gm, prefix, a_full, b_full, weight)
    g = gm.graph
    for op in products:
        x, offsets = op.args[0], op.args[2]
        with g.inserting_before(op.next):  # inside the block, as outline_blocks wants it
            a, b = g.get_attr(a_name), g.get_attr(b_name)
            low = g.call_function(expert_branch, (x, a, b, offsets, scaling, experts, first,
                                                  weight.shape[0]))
            out = g.call_function(aten.add.Tensor, (op, low))
        for n in (a, b, low, out):
            n.meta["nn_module_stack"] = op.meta.get("nn_module_stack", {})
        out.meta["val"] = op.meta.get("val")
        op.replace_all_uses_with(out, delete_user_cb=lambda u, out=out: u is not out)
    lora_record(gm)[prefix] = Adapter(w_name, scaling, experts, transposed)
    return a_name, b_name


def refuse_missed(gm: fx.GraphModule, config: object, adapted: set[str],
                   unplaced: set[str]) -> None:
    """Refuse, rather than train another adapter than peft's: a targeted module with a
    2-D weight whose linear the graph does not show as one (a router computing its
    logits from a cast copy of its weight), a targeted parameter no linear or experts bank
    took, or a given adapter tensor nothing took."""
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = {n.rpartition(".")[0] for n, p in gm.named_parameters()
               if n.endswith(".weight") and p.dim() == 2}
    done = {w.rpartition(".")[0] for w in adapted}
    missed = sorted(m for m in modules - done if check_target_module_exists(config, m))
    missed += sorted(n for n, _ in gm.named_parameters()
                     if _targets_parameter(config, n) and n not in adapted)
    if missed or unplaced:
        what = missed[0] if missed else sorted(unplaced)[0]
        raise CollieError(f"an adapter on {what} cannot be built here: its weight reaches the "
                          "graph other than as a plain linear's (peft would adapt it); "
                          f"leave {what.rpartition('.')[2] if missed else 'it'} out of "
                          "the target modules")


_CASTS = (aten.to.dtype, aten._to_copy.default)


def _linear_reading(n: fx.Node
                    ) -> tuple[fx.Node, str, int, fx.Node | None, torch.dtype | None] | None:
    """(input, weight name, output-feature dim, bias, dtype) of a linear: as
    :func:`~.tensor_parallel.linear_operands` finds them (dtype None), or an
    ``aten.linear`` reading its weight through a cast (a router computing in fp32,
    ``F.linear(x.float(), W.float())``), with the dtype it casts to."""
    found = linear_operands(n)
    if found is not None:
        return (*found, None)
    w = n.args[1] if n.target == aten.linear.default else None
    dtype = getattr(getattr(w, "meta", {}).get("val"), "dtype", None)
    cast = False
    while isinstance(w, fx.Node) and w.op == "call_function" and w.target in _CASTS:
        w, cast = w.args[0], True
    if cast and w.op == "get_attr":
        return n.args[0], w.target, 0, n.args[2] if len(n.args) > 2 else None, dtype
    return None


def _insert_branch(gm: fx.GraphModule, lin: fx.Node, x: fx.Node, a_name: str,
                   b_name: str, scaling: float, dropout: float,
                   cast: torch.dtype | None = None, values: str | None = None,
                   divisor: float | None = None) -> None:
    """``lin + scaling * B(A(dropout(x)))`` for ``lin`` reading ``x`` (A and B cast to
    ``cast`` first where the linear casts its weight so); every user of ``lin`` (a tp
    all-reduce included) reads the sum instead. AdaLoRA's form, in peft's order of
    operations: A scaled by the singular ``values`` E first, the branch divided by
    ``divisor`` last."""
    g = gm.graph
    inp = x
    with g.inserting_before(lin.next):
        if dropout:
            x = g.call_function(aten.dropout.default, (x, dropout, True))
        a = g.get_attr(a_name)
        b = g.get_attr(b_name)
        if cast is not None:
            a = g.call_function(aten.to.dtype, (a, cast))
            b = g.call_function(aten.to.dtype, (b, cast))
        made = [x, a, b]
        if values is not None:
            e = g.get_attr(values)
            a = g.call_function(aten.mul.Tensor, (a, e))
            made += [e, a]
        h = g.call_function(aten.linear.default, (x, a))
        low = g.call_function(aten.linear.default, (h, b))
        y = g.call_function(aten.mul.Tensor, (low, scaling))
        made += [h, low, y]
        if divisor is not None:
            y = g.call_function(aten.div.Tensor, (y, divisor))
            made.append(y)
        out = g.call_function(aten.add.Tensor, (lin, y))
    for n in (*made, out):
        if isinstance(n, fx.Node) and n is not inp:
            n.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    out.meta["val"] = lin.meta.get("val")
    lin.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)


def _insert_dora(gm: fx.GraphModule, lin: fx.Node, x: fx.Node, w_name: str, out_dim: int,
                 bias: fx.Node | None, a_name: str, b_name: str, m_name: str,
                 scaling: float, dropout: float, norm: DoraNorm) -> None:
    """``lin + (m/n - 1)·W x' + (m/n)·scaling·B(A(x'))`` as peft's DoRA computes it, ``n``
    the detached norm (:class:`DoraNorm`), ``x'`` the dropped-out input; without dropout
    ``W x'`` is ``lin`` less its bias, not a second product."""
    g = gm.graph
    inp = x
    with g.inserting_before(lin.next):
        if dropout:
            x = g.call_function(aten.dropout.default, (x, dropout, True))
        w, a, b, m = (g.get_attr(n) for n in (w_name, a_name, b_name, m_name))
        if dropout:
            base = g.call_function(aten.matmul.default if out_dim else aten.linear.default,
                                   (x, w))
        elif bias is not None:
            base = g.call_function(aten.sub.Tensor, (lin, bias))
        else:
            base = lin
        n = module_node(gm, norm, "lora_dora_norm", (w, a, b), lin, w_name)
        scale = g.call_function(aten.div.Tensor, (m, n))
        h = g.call_function(aten.linear.default, (x, a))
        low = g.call_function(aten.linear.default, (h, b))
        y = g.call_function(aten.mul.Tensor, (low, scaling))
        lora_part = g.call_function(aten.mul.Tensor, (y, scale))
        less = g.call_function(aten.sub.Tensor, (scale, 1.0))
        base_part = g.call_function(aten.mul.Tensor, (base, less))
        both = g.call_function(aten.add.Tensor, (base_part, lora_part))
        out = g.call_function(aten.add.Tensor, (lin, both))
    for node in (x, w, a, b, m, base, n, scale, h, low, y, lora_part, less, base_part, both,
                 out):
        if isinstance(node, fx.Node) and node is not inp and node is not lin:
            node.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    out.meta["val"] = lin.meta.get("val")
    keep = {out, base_part if base is lin else base}  # they read the base's own output
    lin.replace_all_uses_with(out, delete_user_cb=lambda u: u not in keep)
