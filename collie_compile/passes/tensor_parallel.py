"""Tensor parallelism as a graph rewrite (Megatron's column/row layout).

Every linear of a decoder block is column-parallel (output features split over the tp
ranks) or row-parallel (input features split, partial outputs summed), as the layout
says; the layout is what the cost model priced (:mod:`collie_compile.capture.annotate` marks the
region between a column linear and the row linear that closes it). The pass

- replaces each sharded weight (and bias) by this rank's slice, in whole attention heads
  for q/k/v; with fewer KV heads than tp ranks (GQA) each rank keeps the one KV head its
  query heads use, and ranks sharing a KV head sum its gradient (``partial_grads``);
- puts an identity-forward/all-reduce-backward op in front of column linears and an
  all-reduce-forward/identity-backward op after row linears (bias added once, after it);
- rewrites shape constants of views, reshapes and expands whose input is now sharded
  (head counts, GQA repeat factors), found by running the graph on fake tensors.

With ``"vocab"`` for the embedding and the LM head (vocabulary divisible by tp), each rank
holds a slice of the vocabulary: the embedding looks up the ids in its slice and sums
over tp, and the head produces this rank's slice of the logits, which
:func:`vocab_parallel_cross_entropy` turns into the loss without ever gathering them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from collie_compile.capture.annotate import weight_of
from collie_compile.errors import CollieError
from collie_compile.passes.collectives import (
    CopyToTP,
    ReduceFromTP,
    SumOverTP,
    VocabParallelEmbedding,
)

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class Shard:
    """What every tp rank holds of a global parameter along ``dim`` (full size ``size``):
    rank r holds ``ranges[r]``, ``[start, stop)`` ranges of the global tensor concatenated
    in order. One range for a plain split; one per part for a fused projection (q|k|v or
    gate|up in one weight), so each rank's parts line up with its heads."""

    dim: int
    size: int
    ranges: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def width(self) -> int:
        """The local size along ``dim`` (the same on every rank)."""
        return sum(b - a for a, b in self.ranges[0])

    def along(self, dim: int) -> Shard:
        return Shard(dim, self.size, self.ranges)

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice of the global tensor ``full``."""
        return torch.cat([full.narrow(self.dim, a, b - a) for a, b in self.ranges[rank]],
                         dim=self.dim)

    def assemble(self, local: list[torch.Tensor]) -> torch.Tensor:
        """The global tensor from every rank's slice (ranks sharing a slice agree)."""
        shape = list(local[0].shape)
        shape[self.dim] = self.size
        out = local[0].new_empty(shape)
        for rank, t in enumerate(local):
            at = 0
            for a, b in self.ranges[rank]:
                out.narrow(self.dim, a, b - a).copy_(t.narrow(self.dim, at, b - a))
                at += b - a
        return out

    def holders(self) -> list[list[int]]:
        """The sets of tp ranks holding the same slice, a partition of the group (sets
        of more than one only for GQA KV heads fewer than the ranks)."""
        sets: dict[tuple, list[int]] = {}
        for rank, r in enumerate(self.ranges):
            sets.setdefault(r, []).append(rank)
        return list(sets.values())

    def first(self, rank: int) -> bool:
        """Whether no lower rank holds the same slice."""
        return self.ranges.index(self.ranges[rank]) == rank

    def global_ranges(self, rank: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Where ``[lo, hi)`` of rank ``rank``'s local slice lies in the global tensor:
        (global start, local start, length) per contiguous run."""
        out, at = [], 0
        for a, b in self.ranges[rank]:
            s, e = max(lo, at), min(hi, at + b - a)
            if s < e:
                out.append((a + s - at, s, e - s))
            at += b - a
        return out

    @staticmethod
    def even(size: int, units: int, tp: int, what: str) -> Shard:
        """``size`` features in ``units`` equal units (heads, or single features) split
        over ``tp`` ranks along dim 0; with fewer units than ranks (GQA KV heads) each
        unit goes whole to ``tp // units`` ranks."""
        unit = size // units
        if units % tp == 0:
            per = units // tp
            ranges = [((r * per * unit, (r + 1) * per * unit),) for r in range(tp)]
        elif tp % units == 0:
            share = tp // units
            ranges = [(((r // share) * unit, (r // share + 1) * unit),) for r in range(tp)]
        else:
            raise CollieError(f"tp={tp} does not divide the {units} heads/features of {what} "
                              "(nor the other way round); pick a tp that divides them")
        return Shard(0, size, tuple(ranges))

    @staticmethod
    def fused(parts: list[Shard]) -> Shard:
        """The shard of a weight whose dim 0 is ``parts`` one after another, each split on
        its own."""
        ranges, base = [[] for _ in parts[0].ranges], 0
        for part in parts:
            for rank, r in enumerate(part.ranges):
                ranges[rank] += [(base + a, base + b) for a, b in r]
            base += part.size
        return Shard(0, base, tuple(tuple(r) for r in ranges))


def head_units(features: int, num_heads: int, num_kv_heads: int, head_dim: int
               ) -> tuple[int, int]:
    """(units, unit size) a projection of ``features`` outputs is split in: whole heads
    for attention projections, single features otherwise."""
    if features in (num_heads * head_dim, num_kv_heads * head_dim):
        return features // head_dim, head_dim
    return features, 1


@dataclass
class TPRecord:
    """What tensor parallelism did to a graph, for the runtime: each sharded parameter's
    :class:`Shard`, the parameters whose gradient tp peers must sum (name -> a partition
    of the tp group into rank sets, the same on every rank), and this rank's slice of
    the vocabulary when the LM head is vocabulary-parallel."""

    shards: dict[str, Shard] = field(default_factory=dict)
    partial_grads: dict[str, list[list[int]]] = field(default_factory=dict)
    vocab_slice: tuple[int, int] | None = None


def tp_record(gm: fx.GraphModule) -> TPRecord:
    """The record :func:`tensor_parallel` (and :func:`~collie_compile.passes.lora.lora`)
    keep with ``gm``; an empty one for a graph tp never touched."""
    return gm.meta.setdefault("collie_tensor_parallel", TPRecord())


def tensor_parallel(gm: fx.GraphModule, layout: dict[str, str], group: dist.ProcessGroup,
                    rank: int, tp: int, num_heads: int, num_kv_heads: int, head_dim: int
                    ) -> fx.GraphModule:
    """Shard ``gm`` (a captured, static-shape training graph) for tp rank ``rank``.

    ``layout`` maps linear node names to ``"column"`` or ``"row"``, and the embedding
    and LM head nodes optionally to ``"vocab"``; other nodes run replicated. A column
    linear whose output is cut into parts (q|k|v or gate|up fused in one weight) is split
    part by part, and the cuts are rewritten to the local part sizes. What it
    sharded is kept in :func:`tp_record`. Assumes the linears are ``aten.linear``,
    ``aten.addmm`` (Conv1D) or ``aten.matmul`` on 2-D weights read by ``get_attr``,
    possibly transposed.
    """
    record = tp_record(gm)
    if tp == 1:
        return gm
    shards: dict[str, Shard] = {}
    partial: dict[str, list[list[int]]] = {}
    copies: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, how in layout.items():
        lin = by_name[name]
        if how == "vocab" and lin.target == aten.embedding.default:
            w_name = lin.args[0].target
            weight = gm.get_parameter(w_name)
            s = Shard.even(weight.shape[0], weight.shape[0], tp, w_name)
            _set_param(gm, w_name, s.take(weight, rank))
            shards[w_name] = s
            padding_idx, by_freq = _embedding_options(lin)
            if by_freq:
                raise CollieError(f"tensor_parallel: {w_name} scales gradients by token "
                                  "frequency, which a vocabulary split cannot; use tp=1")
            (start, stop), = s.ranges[rank]
            with gm.graph.inserting_after(lin):
                emb = module_node(gm, VocabParallelEmbedding(group, start, stop,
                                                              padding_idx),
                                   "tp_embedding", lin.args[:2], lin, w_name)
            lin.replace_all_uses_with(emb)
            gm.graph.erase_node(lin)
            continue
        operands = linear_operands(lin)
        if operands is None:
            raise CollieError(f"tensor_parallel: {name} ({lin.target}) in module "
                              f"{_module_path(lin)!r} is not a linear on a weight this pass "
                              "can shard; use tp=1")
        x, w_name, out_dim, b_node = operands
        weight = gm.get_parameter(w_name)
        out_f, in_f = weight.shape[out_dim], weight.shape[1 - out_dim]
        if how in ("column", "vocab"):
            cuts = _feature_cuts(lin) if how == "column" else []
            bounds = sorted({0, out_f, *(c for n in cuts for c in _cut_points(n, out_f))})
            if how == "vocab":
                s = Shard.even(out_f, out_f, tp, w_name)
            else:
                s = Shard.fused([Shard.even(b - a, head_units(b - a, num_heads, num_kv_heads,
                                                              head_dim)[0], tp, w_name)
                                 for a, b in zip(bounds, bounds[1:], strict=False)])
            _check_fused(s, bounds, w_name)
            _set_param(gm, w_name, s.along(out_dim).take(weight, rank))
            shards[w_name] = s.along(out_dim)
            if b_node is not None:
                _set_param(gm, b_node.target, s.take(gm.get_parameter(b_node.target), rank))
                shards[b_node.target] = s
            if how == "vocab":
                (start, stop), = s.ranges[rank]
                record.vocab_slice = (start, stop)
            local = _local_bounds(s, bounds, rank)
            for n in cuts:
                _recut(n, dict(zip(bounds, local, strict=True)))
            sharers = s.holders()
            if len(sharers[0]) > 1:
                partial[w_name] = sharers
                if b_node is not None:
                    partial[b_node.target] = sharers
            if x not in copies:
                with gm.graph.inserting_after(x):
                    copies[x] = module_node(gm, CopyToTP(group), "tp_copy", (x,), lin,
                                             w_name)
            lin.replace_input_with(x, copies[x])
        elif how == "row":
            units, _ = head_units(in_f, num_heads, num_kv_heads, head_dim)
            s = Shard.even(in_f, units, tp, w_name).along(1 - out_dim)
            if len(s.holders()[0]) > 1:
                raise CollieError(f"tensor_parallel: row-parallel {w_name} cannot be split "
                                  f"{tp} ways")
            _set_param(gm, w_name, s.take(weight, rank))
            shards[w_name] = s
            with gm.graph.inserting_after(lin):
                red = module_node(gm, ReduceFromTP(group), "tp_reduce", (lin,), lin, w_name)
            lin.replace_all_uses_with(red, delete_user_cb=lambda u, red=red: u is not red)
            if b_node is not None:  # add the bias once, after the sum
                if lin.target == aten.addmm.default:
                    lin.target, lin.args = aten.mm.default, lin.args[1:]
                else:
                    lin.args = lin.args[:2]
                with gm.graph.inserting_after(red):
                    add = gm.graph.call_function(aten.add.Tensor, (red, b_node))
                    add.meta = dict(lin.meta)
                red.replace_all_uses_with(add, delete_user_cb=lambda u, add=add: u is not add)
        else:
            raise RuntimeError(f"tensor_parallel: unknown strategy {how!r} for {name}")
    consumers = _fix_shapes(gm, tp, rank, (num_heads, num_kv_heads, head_dim), group, shards)
    for w_name in _on_heads_only(gm, consumers, set(shards) | set(partial)):
        # a replicated weight applied to this rank's heads only (per-head q/k norms):
        # each rank's gradient is its heads' part, summed over the whole group
        partial[w_name] = [list(range(tp))]
    gm.graph.lint()
    gm.recompile()
    record.shards.update(shards)
    record.partial_grads.update(partial)
    return gm


_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.slice.Tensor, aten.unsafe_split.Tensor, aten.narrow.default}
_VIEWS = _RESHAPES | {aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
                      aten.squeeze.dim, aten.contiguous.default}


def _cut_dim(n: fx.Node) -> int:
    at = 1 if n.target in (aten.slice.Tensor, aten.narrow.default, aten.select.int) else 2
    return n.args[at] if len(n.args) > at else n.kwargs.get("dim", 0)


def _feature_cuts(lin: fx.Node) -> list[fx.Node]:
    """The splits and slices that cut the output features of ``lin`` into parts (q/k/v or
    gate/up fused in one linear): ops on its last dim at full width, possibly after views
    that keep that dim."""
    width = lin.meta["val"].shape[-1]
    stack, seen, cuts = list(lin.users), set(), []
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        v = n.args[0].meta.get("val") if n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] != width:
            continue  # not a view of the features (a scalar: xIELU's alpha)
        if n.target in _SPLITS and _cut_dim(n) % v.dim() == v.dim() - 1:
            cuts.append(n)
        elif n.target in _VIEWS:
            stack.extend(n.users)
    return cuts


def _cut_points(n: fx.Node, width: int) -> list[int]:
    """The feature offsets at which the split/slice ``n`` cuts a last dim of ``width``."""
    if n.target == aten.chunk.default:
        k = n.args[1]
        step = -(-width // k)
        return list(range(0, width, step))
    if n.target in (aten.split.Tensor, aten.unsafe_split.Tensor):
        return list(range(0, width, n.args[1]))
    if n.target == aten.split_with_sizes.default:
        return [sum(n.args[1][:i]) for i in range(len(n.args[1]))]
    if n.target == aten.narrow.default:
        return [n.args[2], n.args[2] + n.args[3]]
    start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
    end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else width
    if (n.args[4] if len(n.args) > 4 else 1) != 1:
        raise CollieError(f"tensor_parallel: {n.name} in module {_module_path(n)!r} takes "
                          "every other feature of a fused projection; use tp=1")
    return [min(max(start + width if start < 0 else start, 0), width),
            min(max(end + width if end < 0 else end, 0), width)]


def _check_fused(s: Shard, bounds: list[int], w_name: str) -> None:
    """Refuse a fused weight whose parts are shared by different sets of ranks (a GQA
    K/V part with fewer heads than ranks next to a query part): its rows would need
    different gradient sums."""
    if len(bounds) == 2:
        return
    parts = [Shard(0, s.size, tuple(tuple(r for r in rs if a <= r[0] < b) for rs in s.ranges))
             for a, b in zip(bounds, bounds[1:], strict=False)]
    if any(sorted(p.holders()) != sorted(s.holders()) for p in parts):
        raise CollieError(f"tensor_parallel: {w_name.removesuffix('.weight')} fuses "
                          "projections that tp would split differently (fewer K/V heads "
                          "than tp ranks next to the query heads); use a tp that divides "
                          "the K/V heads")


def _local_bounds(s: Shard, bounds: list[int], rank: int) -> list[int]:
    """Where each global part boundary falls in rank ``rank``'s slice."""
    out = []
    for b in bounds:
        out.append(sum(min(e, b) - a for a, e in s.ranges[rank] if a < b))
    return out


def _recut(n: fx.Node, local: dict[int, int]) -> None:
    """Rewrite the split/slice ``n`` of a fused projection's output for this rank's
    slice, ``local`` mapping each global part boundary to the local one."""
    width = max(local)
    points = _cut_points(n, width)
    if n.target == aten.slice.Tensor or n.target == aten.narrow.default:
        start, end = local[points[0]], local[points[1]]
        if n.target == aten.narrow.default:
            n.args = (n.args[0], n.args[1], start, end - start)
        else:
            n.args = (n.args[0], n.args[1], start, end, *n.args[4:])
        n.meta["tp_recut"] = True
        return
    cuts = [*points, width]
    sizes = [local[b] - local[a] for a, b in zip(cuts, cuts[1:], strict=False)]
    n.target = aten.split_with_sizes.default
    n.args = (n.args[0], sizes, _cut_dim(n))
    n.kwargs = {}
    n.meta["tp_recut"] = True


def _embedding_options(node: fx.Node) -> tuple[int, bool]:
    """(padding_idx, scale_grad_by_freq) of an ``aten.embedding`` node."""
    defaults = (-1, False)
    given = tuple(node.args[2:4])
    return (*given, *defaults[len(given):])


def _set_param(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    setattr(mod, leaf, torch.nn.Parameter(value.detach().clone(),
                                          requires_grad=getattr(mod, leaf).requires_grad))


def module_node(gm: fx.GraphModule, mod: torch.nn.Module, stem: str, args: tuple,
                 like: fx.Node, w_name: str) -> fx.Node:
    """Call ``mod`` on ``args``, registered beside the weight ``w_name`` that ``like``
    reads (so it belongs to the same block)."""
    owner = w_name.rpartition(".")[0]
    path = f"{owner}.{stem}" if owner else stem  # an op outside every module: at the root
    gm.add_submodule(path, mod)
    node = gm.graph.call_module(path, args)
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "val")}
    if stem == "tp_copy":
        node.meta["val"] = args[0].meta.get("val")
    return node


def linear_operands(n: fx.Node) -> tuple[fx.Node, str, int, fx.Node | None] | None:
    """(input, weight name, the weight's output-feature dim, bias node) of a linear
    written as ``aten.linear``, ``addmm(b, x, W)`` (GPT-2's Conv1D, W is [in, out]) or
    ``x @ W`` / ``x @ W.T`` (Falcon); None for anything else."""
    if n.target == aten.linear.default and n.args[1].op == "get_attr":
        return n.args[0], n.args[1].target, 0, n.args[2] if len(n.args) > 2 else None
    if n.target == aten.addmm.default and n.args[2].op == "get_attr" and len(n.args) == 3 \
            and not n.kwargs:
        return n.args[1], n.args[2].target, 1, n.args[0]
    if n.target in (aten.mm.default, aten.matmul.default):
        w = weight_of(n.args[1])
        if w.op == "get_attr":
            return n.args[0], w.target, 0 if w is not n.args[1] else 1, None
    return None


def _fix_shapes(gm: fx.GraphModule, tp: int, rank: int, heads: tuple[int, int, int],
                group: dist.ProcessGroup, shards: dict[str, Shard]) -> set[fx.Node]:
    """Run the sharded graph on fake tensors, rewriting the shape arguments of reshapes
    and expands whose input lost a factor to sharding, and giving a per-head input
    computed outside the heads (ALiBi biases) to a sharded op as this rank's heads only.
    A sum or mean over features split between ranks (an RMS norm over all heads) becomes
    a local sum, summed over tp, and its per-feature weight is sharded with the features
    (recorded in ``shards``). Returns the ops that take a sharded input; refuses any
    other reduction over a sharded dim, which no rank can compute from its slice."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, object] = {}
    shrunk: set[fx.Node] = set()  # nodes whose value tp sharding made smaller
    consumers: set[fx.Node] = set()  # ops with a sharded input
    taken: list[str] = []  # per-feature weights sharded with the features they scale

    def val(a: object) -> object:
        return fx.node.map_arg(a, lambda n: env[n])

    with _quiet_fake_failures(), mode:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = n.meta["val"]
                env[n] = torch.empty(v.shape, dtype=v.dtype, device=v.device)
            elif n.op == "get_attr":
                obj = _attr(gm, n.target)
                if not isinstance(obj, torch.Tensor):
                    users = ", ".join(sorted({_module_path(u) for u in n.users}))
                    raise CollieError(f"tensor_parallel: {n.target} is a subgraph (control "
                                      f"flow) run by {users!r}, which this pass cannot "
                                      "shard; use tp=1")
                env[n] = mode.from_tensor(obj)
            elif n.op == "call_module":
                sub = gm.get_submodule(n.target)
                if isinstance(sub, (CopyToTP, ReduceFromTP, SumOverTP)):
                    env[n] = env[n.args[0]]
                elif isinstance(n.meta.get("val"), torch.Tensor):  # shape unchanged
                    v = n.meta["val"]
                    env[n] = torch.empty(v.shape, dtype=v.dtype, device=v.device)
                else:
                    env[n] = None
            elif n.op == "call_function":
                inp = n.args[0] if n.args else None
                old = inp.meta.get("val") if isinstance(inp, fx.Node) else None
                new = env.get(inp) if isinstance(inp, fx.Node) else None
                if (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)
                        and tuple(old.shape) != tuple(new.shape)):
                    if n.target in _RESHAPES:
                        n.args = (inp, _reshaped(tuple(old.shape), tuple(new.shape),
                                                 tuple(n.meta["val"].shape), list(n.args[1]),
                                                 heads), *n.args[2:])
                    elif n.target == aten.expand.default:
                        n.args = (inp, _expanded(tuple(old.shape), tuple(new.shape),
                                                 list(n.args[1]), tp), *n.args[2:])
                if not _spread_reduction(gm, n, env, tp, group):
                    _check_reduction(n, env)
                _check_split(n, env)
                try:
                    try:
                        env[n] = n.target(*val(n.args), **val(n.kwargs))
                    except Exception:
                        if not (_take_share(gm, n, env, shrunk, tp, rank, heads[:2], group)
                                or _shard_feature_weight(gm, n, env, shrunk, tp, heads,
                                                         shards, taken)):
                            raise
                        env[n] = n.target(*val(n.args), **val(n.kwargs))
                except Exception as e:
                    mod = _module_path(n)
                    raise CollieError(
                        f"tensor_parallel: after sharding, {n.name} ({n.target}) in module "
                        f"{mod!r} fails on the local shapes: {str(e).splitlines()[0]}; this "
                        "model's layout is not supported with tp>1") from e
            if n.op in ("call_function", "call_module") and any(
                    a in shrunk for a in n.all_input_nodes):
                consumers.add(n)
            new, old = env.get(n), n.meta.get("val")
            if (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)
                    and tuple(new.shape) != tuple(old.shape)):
                shrunk.add(n)
    for name in taken:
        _set_param(gm, name, shards[name].take(gm.get_parameter(name).detach(), rank))
    return consumers


@contextlib.contextmanager
def _quiet_fake_failures() -> Iterator[None]:
    """Ops are tried on the local shapes first and fixed where they fail; fake tensors log
    each failure at error level, which here is expected, not news."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _spread_reduction(gm: fx.GraphModule, n: fx.Node, env: dict, tp: int,
                      group: dist.ProcessGroup) -> bool:
    """Rewrite ``n``, a sum or mean over dims that tp splits evenly between ranks (each
    feature on one rank), as the local sum, summed over tp (and divided by the global
    count for a mean). Returns whether it did."""
    inp = n.args[0] if n.args else None
    if n.target not in (aten.mean.dim, aten.sum.dim_IntList) or not isinstance(
            env.get(inp), torch.Tensor):
        return False
    old, new = tuple(inp.meta["val"].shape), tuple(env[inp].shape)
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    dims = list(range(len(old))) if dims is None else [dims] if isinstance(dims, int) \
        else list(dims)
    split = [d for d in dims if old[d] != new[d]]
    if not split or any(old[d] != new[d] * tp for d in split):
        return False  # nothing split, or features held by several ranks
    count = math.prod(old[d] for d in dims)
    mean = n.target == aten.mean.dim
    n.target = aten.sum.dim_IntList
    g = gm.graph
    with g.inserting_after(n):
        total = module_node(gm, SumOverTP(group), f"tp_sum_{n.name}", (n,), n,
                             f"{_module_path(n)}.{n.name}")
    last = total
    if mean:
        with g.inserting_after(total):
            last = g.call_function(aten.div.Tensor, (total, count))
        last.meta = dict(n.meta)
    n.replace_all_uses_with(last, delete_user_cb=lambda u: u is not total)
    return True


def _shard_feature_weight(gm: fx.GraphModule, n: fx.Node, env: dict, shrunk: set,
                          tp: int, heads: tuple[int, int, int], shards: dict[str, Shard],
                          taken: list[str]) -> bool:
    """Where ``n`` applies a replicated per-feature weight (read by ``n`` only) to features
    tp split between ranks (the weight of an RMS norm over all heads), shard it as a
    column linear splits that many features (into ``shards``, its name onto ``taken``).
    Returns whether it did."""
    sharded = [env[a] for a in n.all_input_nodes if a in shrunk]
    done = False
    for a in n.args:
        if not isinstance(a, fx.Node) or a.op != "get_attr" or len(a.users) != 1:
            continue
        w = _attr(gm, a.target)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 1 or not any(
                t.dim() and t.shape[-1] * tp == w.shape[0] for t in sharded):
            continue
        units, _ = head_units(w.shape[0], *heads)
        s = shards[a.target] = Shard.even(w.shape[0], units, tp, a.target)
        taken.append(a.target)  # cut outside the fake mode, by _fix_shapes
        env[a] = torch.empty(s.width, dtype=w.dtype, device=env[a].device)
        done = True
    return done


def _on_heads_only(gm: fx.GraphModule, consumers: set[fx.Node], sharded: set[str]
                   ) -> set[str]:
    """The replicated trainable parameters whose every use reaches an op with a sharded
    input (``consumers``) through replicated ops only (a per-head norm weight, also as
    ``1 + w``): their gradient on each rank is its heads' part. Refuses one that also
    reaches the output or a tp collective another way, whose gradient would be part
    complete, part partial."""
    out = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in sharded:
            continue
        p = _attr(gm, node.target)
        if not isinstance(p, torch.nn.Parameter) or not p.requires_grad:
            continue
        ends, stack, seen = set(), [node], set()
        while stack:
            m = stack.pop()
            for u in m.users:
                if u in seen:
                    continue
                seen.add(u)
                if u in consumers:
                    ends.add("heads")
                elif u.op == "output" or (u.op == "call_module" and isinstance(
                        gm.get_submodule(u.target), (CopyToTP, ReduceFromTP))):
                    ends.add("whole")
                else:
                    stack.append(u)
        if ends == {"heads"}:
            out.add(node.target)
        elif ends == {"heads", "whole"}:
            uses = ", ".join(sorted({_module_path(u) for u in node.users}))
            raise CollieError(f"tensor_parallel: {node.target} (used in {uses!r}) feeds "
                              "both this rank's heads and replicated computations, whose "
                              "gradients tp cannot combine; use tp=1")
    return out


def _take_share(gm: fx.GraphModule, n: fx.Node, env: dict, shrunk: set, tp: int,
                rank: int, heads: tuple[int, int], group: dist.ProcessGroup) -> bool:
    """Where ``n`` meets a sharded tensor with a replicated one that is whole on a dim
    where the sharded one has this rank's share, read this rank's share of the
    replicated one: on the last dim (features), the contiguous slice a column linear
    gives the rank (Gemma-4's per-layer inputs gating a sharded projection); on another
    dim holding all query or key/value ``heads``, the rank's block of heads (ALiBi's
    per-head bias added to sharded attention scores, also merged with the batch as
    [b*h]; prefix tuning's virtual keys concatenated with the rank's keys). A
    replicated input computed from trainable weights (Doge's dynamic mask, per-head
    learned scalars, a prefix) first passes a CopyToTP: each rank's gradient of it
    covers its share only, and is summed over tp there. Returns whether it rewrote an
    input."""
    inputs = [a for arg in n.args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    tensors = [a for a in inputs if isinstance(a, fx.Node)
               and isinstance(env.get(a), torch.Tensor)]
    # each sharded input beside its shape before sharding: a dim it shares with a
    # replicated input must be one that shrank, not one of equal size by chance (BLOOM
    # at seq 32 with 16-wide heads took the sequence dim of ALiBi for features)
    sharded = [(env[a], tuple(a.meta["val"].shape)) for a in tensors if a in shrunk
               and isinstance(a.meta.get("val"), torch.Tensor)]
    if not sharded:
        return False
    done = False
    g = gm.graph
    for a in tensors:
        if a in shrunk:
            continue
        v = env[a]
        for k in range(1, v.dim() + 1):
            size = v.shape[-k]
            if size % tp or not any(t.dim() >= k and t.shape[-k] == size // tp
                                    and old[-k] == size for t, old in sharded):
                continue
            d = v.dim() - k
            num_heads = next((h for h in heads if size % h == 0 and h % tp == 0), None)
            if k == 1:  # features: one contiguous slice per rank
                split, at, width, merged = None, d, size // tp, None
            elif num_heads is not None:
                # [outer * heads] (outer = 1, or a batch merged before the heads, BLOOM's
                # [b*h, 1, s] ALiBi): view the heads apart, take this rank's, merge back
                outer, shape = size // num_heads, list(v.shape)
                split = [*shape[:d], outer, num_heads, *shape[d + 1:]]
                at, width = d + 1, num_heads // tp
                merged = [*shape[:d], outer * width, *shape[d + 1:]]
            else:
                continue
            src, made = a, []
            with g.inserting_before(n):
                if _reads_trainable(gm, a):
                    src = module_node(gm, CopyToTP(group), f"tp_copy_{a.name}", (a,), n,
                                       f"{_module_path(n)}.{a.name}")
                    src.meta["val"], env[src] = a.meta.get("val"), v
                parts = src
                if split is not None:
                    parts = g.call_function(aten.reshape.default, (src, split))
                    env[parts] = v.reshape(split)
                    made.append(parts)
                mine = g.call_function(aten.narrow.default, (parts, at, rank * width, width))
                made.append(mine)
                env[mine] = env[parts].narrow(at, rank * width, width)
                cut = mine
                if merged is not None:
                    cut = g.call_function(aten.reshape.default, (mine, merged))
                    env[cut] = env[mine].reshape(merged)
                    made.append(cut)
            for m in made:
                m.meta = {"nn_module_stack": n.meta.get("nn_module_stack", {}),
                          "val": env[m]}
            n.replace_input_with(a, cut)
            done = True
            break
    return done


def _reads_trainable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is computed from a parameter that requires a gradient."""
    stack, seen = [node], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "get_attr":
            t = _attr(gm, m.target)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                return True
        stack.extend(m.all_input_nodes)
    return False


# Reductions over a dim: (op, index of its dims argument or None for the last dim).
_REDUCTIONS = {
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.var_mean.correction: 1,
    aten.var.correction: 1, aten.amax.default: 1, aten.norm.ScalarOpt_dim: 2,
    aten.linalg_vector_norm.default: 2, aten.layer_norm.default: None,
    aten.native_layer_norm.default: None, aten.rms_norm.default: None,
}


def _check_split(n: fx.Node, env: dict) -> None:
    """Refuse a split, chunk, slice or select along a dim that lost size to sharding,
    other than the cuts of a fused projection (rewritten to the local part sizes): on a
    rank's block of heads it would make groups of the rank's heads, not the model's
    (DiffLlama chunks all heads into two halves)."""
    inp = n.args[0] if n.args else None
    if (n.target not in _SPLITS | {aten.select.int} or n.meta.get("tp_recut")
            or not isinstance(env.get(inp), torch.Tensor)):
        return
    old, new = tuple(inp.meta["val"].shape), tuple(env[inp].shape)
    d = _cut_dim(n) % len(old)
    if old[d] == new[d]:
        return
    if n.target == aten.slice.Tensor and _cut_points(n, old[d]) == [0, old[d]] and (
            len(n.args) < 5 or n.args[4] == 1):
        return  # the whole dim: nothing is cut
    raise CollieError(
        f"tensor_parallel: {n.name} ({n.target}) in module {_module_path(n)!r} cuts a dim "
        "that tp splits between ranks (heads grouped across the whole model), which a "
        "rank's block of heads does not line up with; use tp=1 (dp, pp and ZeRO work)")


def _check_reduction(n: fx.Node, env: dict) -> None:
    """Refuse a reduction over a dim that lost size to sharding."""
    inp = n.args[0] if n.args else None
    if n.target not in _REDUCTIONS or not isinstance(env.get(inp), torch.Tensor):
        return
    old, new = tuple(inp.meta["val"].shape), tuple(env[inp].shape)
    if old == new:
        return
    at = _REDUCTIONS[n.target]
    if at is None:  # layer/RMS norm: over the trailing dims of normalized_shape
        dims = list(range(len(old) - len(n.args[1]), len(old)))
    else:
        given = n.args[at] if len(n.args) > at else n.kwargs.get("dim")
        dims = (list(range(len(old))) if given is None
                else [given] if isinstance(given, int) else list(given))
    if any(old[d] != new[d] for d in dims):
        raise CollieError(
            f"tensor_parallel: {n.name} ({n.target}) in module {_module_path(n)!r} reduces "
            "over features that tp splits between ranks (a norm over all heads together), "
            "which no rank can compute from its slice; use tp=1 (dp, pp and ZeRO work)")


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _reshaped(old_in: tuple, new_in: tuple, old_out: tuple, arg: list,
              heads: tuple[int, ...] = ()) -> list:
    """Shape argument of a reshape whose input shrank from ``old_in`` to ``new_in``: each
    output dim takes the factor its input dims lost. Where a dim splits in several, the
    one that is a head count (``heads``) takes it, else the outermost that divides (shards
    are whole heads; a batch dim merged before the heads, as in [b*h, s, d], is not one)."""
    groups, i, j = [], 0, 0
    while i < len(old_in) and j < len(old_out):
        gi, go, pi, po = [i], [j], old_in[i], old_out[j]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                pi, i = pi * old_in[i], i + 1
                gi.append(i - 1)
            else:
                po, j = po * old_out[j], j + 1
                go.append(j - 1)
        groups.append((gi, go))
    out = list(old_out)
    for gi, go in groups:
        lost = math.prod(old_in[k] for k in gi) // math.prod(new_in[k] for k in gi)
        if lost == 1:
            continue
        fits = [k for k in go if out[k] % lost == 0 and out[k] > 1]
        named = [k for k in fits if out[k] in heads]
        if len(named) > 1 and len(old_in) - 1 not in gi:
            # [b*h] split into [b, h] with b equal to a head count: no telling them apart
            raise CollieError(f"tensor_parallel: a reshape to {list(old_out)} splits a "
                              "batch-and-heads dim whose batch size equals the head "
                              "count; use a micro-batch size other than the head count")
        d = (named or fits)[0]
        out[d] //= lost
    return [-1 if a == -1 else o for a, o in zip(arg, out, strict=True)]


def _expanded(old_in: tuple, new_in: tuple, arg: list, tp: int) -> list:
    """Size argument of an expand whose input shrank: kept dims follow the input; a
    broadcast dim (GQA's repeat factor) shrinks so the result has the local head count."""
    lost = math.prod(old_in) // math.prod(new_in)
    off = len(arg) - len(old_in)
    out = list(arg)
    for k, a in enumerate(arg):
        if a == -1 or k < off:
            continue
        if old_in[k - off] == a:
            out[k] = new_in[k - off]
        elif old_in[k - off] == 1 and lost != tp:
            out[k] = a * lost // tp
    return out
