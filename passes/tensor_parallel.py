"""Tensor parallelism as a graph rewrite (Megatron's column/row layout).

Every linear of a decoder block is column-parallel (output features split over the tp
ranks) or row-parallel (input features split, partial outputs summed), as the layout
says; the layout is what the cost model priced (:mod:`collie_compile.annotate` marks the
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

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from collie_compile.errors import CollieError

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class Shard:
    """The slice of a global parameter one tp rank holds: ``[start, stop)`` along ``dim``
    of a tensor whose full size along it is ``size``."""

    dim: int
    start: int
    stop: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        return g, None


class CopyToTP(torch.nn.Module):
    """Identity forward, all-reduce of the input gradient over the tp group backward."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToTP.apply(x, self.group)


class ReduceFromTP(torch.nn.Module):
    """All-reduce (sum) of partial outputs over the tp group forward, identity backward."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromTP.apply(x, self.group)


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding of the ids in ``[start, stop)`` from this rank's rows (others give 0),
    summed over the tp group."""

    def __init__(self, group: dist.ProcessGroup, start: int, stop: int,
                 padding_idx: int = -1) -> None:
        super().__init__()
        self.group, self.start, self.stop = group, start, stop
        # the padding row gets no gradient, as in the unsharded embedding
        self.padding_idx = padding_idx - start if start <= padding_idx < stop else None

    def forward(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = torch.where(outside, 0, ids - self.start)
        out = torch.nn.functional.embedding(local, weight, padding_idx=self.padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromTP.apply(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, target: torch.Tensor, start: int,
                group: dist.ProcessGroup, ignore_index: int) -> torch.Tensor:
        width = logits.shape[-1]
        top = logits.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        # In place where autograd does not look (inside a Function): the loss's extra
        # memory stays at one [tokens, vocab / tp] buffer beside the logits, and at one
        # beside the saved softmax in backward, as the unsharded cross-entropy's.
        z = logits - top.unsqueeze(-1)
        valid = target != ignore_index
        mine = valid & (target >= start) & (target < start + width)
        idx = (target - start).clamp(0, width - 1)
        picked = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(picked, group=group)
        softmax = z.exp_()
        total = softmax.sum(-1)
        dist.all_reduce(total, group=group)
        softmax.div_(total.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, valid)
        return ((total.log() - picked) * valid).sum()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        softmax, idx, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_((valid.to(grad.dtype) * g).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, start: int,
                                 group: dist.ProcessGroup, ignore_index: int = -100
                                 ) -> torch.Tensor:
    """Sum over positions of cross-entropy, from each tp rank's logits for vocabulary ids
    ``[start, start + logits.shape[-1])`` (max, sum of exponentials and the target's
    logit reduced over ``group``): the same as on gathered logits, which never exist."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return _VocabParallelCE.apply(flat, target.reshape(-1), start, group, ignore_index)


def head_units(features: int, num_heads: int, num_kv_heads: int, head_dim: int
               ) -> tuple[int, int]:
    """(units, unit size) a projection of ``features`` outputs is split in: whole heads
    for attention projections, single features otherwise."""
    if features in (num_heads * head_dim, num_kv_heads * head_dim):
        return features // head_dim, head_dim
    return features, 1


def shard_of(size: int, units: int, tp: int, rank: int, what: str
             ) -> tuple[Shard, list[list[int]]]:
    """This rank's slice of ``size`` features split in ``units`` equal units, and the sets
    of tp ranks holding the same slice (the same on every rank; sets of more than one
    only when units < tp: GQA KV heads)."""
    unit = size // units
    if units % tp == 0:
        per = units // tp
        return (Shard(0, rank * per * unit, (rank + 1) * per * unit, size),
                [[r] for r in range(tp)])
    if tp % units == 0:
        share = tp // units
        u = rank // share
        return (Shard(0, u * unit, (u + 1) * unit, size),
                [list(range(v * share, (v + 1) * share)) for v in range(units)])
    raise CollieError(f"tp={tp} does not divide the {units} heads/features of {what} "
                      "(nor the other way round); pick a tp that divides them")


def tensor_parallel(gm: fx.GraphModule, layout: dict[str, str], group: dist.ProcessGroup,
                    rank: int, tp: int, num_heads: int, num_kv_heads: int, head_dim: int
                    ) -> fx.GraphModule:
    """Shard ``gm`` (a captured, static-shape training graph) for tp rank ``rank``.

    ``layout`` maps linear node names to ``"column"`` or ``"row"``, and the embedding
    and LM head nodes optionally to ``"vocab"``; other nodes run replicated. Records
    ``gm.meta["tp_shards"]`` (parameter name -> :class:`Shard` as a dict),
    ``gm.meta["partial_grads"]`` (parameter name -> the sets of tp ranks that must sum its
    gradient, a partition of the tp group, the same on every rank) and, with a vocabulary-
    parallel head, ``gm.meta["vocab_slice"]``. Assumes the linears are ``aten.linear`` on
    2-D weights read by ``get_attr``.
    """
    if tp == 1:
        gm.meta.setdefault("tp_shards", {})
        gm.meta.setdefault("partial_grads", {})
        return gm
    shards: dict[str, Shard] = {}
    partial: dict[str, list[int]] = {}
    copies: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, how in layout.items():
        lin = by_name[name]
        if how == "vocab" and lin.target == aten.embedding.default:
            w_name = lin.args[0].target
            weight = gm.get_parameter(w_name)
            s, _ = shard_of(weight.shape[0], weight.shape[0], tp, rank, w_name)
            _set_param(gm, w_name, weight[s.start:s.stop])
            shards[w_name] = s
            padding_idx, by_freq = _embedding_options(lin)
            if by_freq:
                raise CollieError(f"tensor_parallel: {w_name} scales gradients by token "
                                  "frequency, which a vocabulary split cannot; use tp=1")
            with gm.graph.inserting_after(lin):
                emb = _module_node(gm, VocabParallelEmbedding(group, s.start, s.stop,
                                                              padding_idx),
                                   "tp_embedding", lin.args[0], lin, args=lin.args[:2])
            lin.replace_all_uses_with(emb)
            gm.graph.erase_node(lin)
            continue
        if lin.target != aten.linear.default or lin.args[1].op != "get_attr":
            raise CollieError(f"tensor_parallel: {name} ({lin.target}) is not an aten.linear on "
                              "a weight; fused projections are not supported, use tp=1")
        w_name = lin.args[1].target
        b_node = lin.args[2] if len(lin.args) > 2 else None
        weight = gm.get_parameter(w_name)
        out_f, in_f = weight.shape
        if how == "column" and _splits_features(lin):
            raise CollieError(f"tensor_parallel: {w_name.removesuffix('.weight')} fuses "
                              "several projections in one linear (its output is split "
                              "into parts), which this pass cannot shard part by part yet; "
                              "use tp=1 (dp, pp and ZeRO work)")
        if how in ("column", "vocab"):
            units = (out_f if how == "vocab"
                     else head_units(out_f, num_heads, num_kv_heads, head_dim)[0])
            s, sharers = shard_of(out_f, units, tp, rank, w_name)
            _set_param(gm, w_name, weight[s.start:s.stop])
            shards[w_name] = s
            if b_node is not None:
                _set_param(gm, b_node.target, gm.get_parameter(b_node.target)[s.start:s.stop])
                shards[b_node.target] = s
            if how == "vocab":
                gm.meta["vocab_slice"] = (s.start, s.stop)
            if len(sharers[0]) > 1:
                partial[w_name] = sharers
                if b_node is not None:
                    partial[b_node.target] = sharers
            x = lin.args[0]
            if x not in copies:
                with gm.graph.inserting_after(x):
                    copies[x] = _module_node(gm, CopyToTP(group), "tp_copy", x, lin)
            lin.replace_input_with(x, copies[x])
        elif how == "row":
            units, _ = head_units(in_f, num_heads, num_kv_heads, head_dim)
            s, sharers = shard_of(in_f, units, tp, rank, w_name)
            if len(sharers[0]) > 1:
                raise CollieError(f"tensor_parallel: row-parallel {w_name} cannot be split "
                                  f"{tp} ways")
            _set_param(gm, w_name, weight[:, s.start:s.stop])
            shards[w_name] = Shard(1, s.start, s.stop, in_f)
            with gm.graph.inserting_after(lin):
                red = _module_node(gm, ReduceFromTP(group), "tp_reduce", lin, lin)
            lin.replace_all_uses_with(red, delete_user_cb=lambda u, red=red: u is not red)
            if b_node is not None:  # add the bias once, after the sum
                lin.args = lin.args[:2]
                with gm.graph.inserting_after(red):
                    add = gm.graph.call_function(aten.add.Tensor, (red, b_node))
                    add.meta = dict(lin.meta)
                red.replace_all_uses_with(add, delete_user_cb=lambda u, add=add: u is not add)
        else:
            raise CollieError(f"tensor_parallel: unknown strategy {how!r} for {name}")
    for w_name in _fix_shapes(gm, tp):
        if w_name not in shards and w_name not in partial:
            # a replicated weight applied to this rank's heads only (per-head q/k norms):
            # each rank's gradient is its heads' part, summed over the whole group
            partial[w_name] = [list(range(tp))]
    gm.graph.lint()
    gm.recompile()
    gm.meta["tp_shards"] = {k: v.to_dict() for k, v in shards.items()}
    gm.meta["partial_grads"] = partial
    return gm


_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.slice.Tensor, aten.unsafe_split.Tensor, aten.narrow.default}


def _splits_features(lin: fx.Node) -> bool:
    """Whether the output features of ``lin`` are cut into parts (q/k/v or gate/up fused
    in one linear) by a split or slice of its last dim, possibly after views."""
    width = lin.meta["val"].shape[-1]
    stack, seen = list(lin.users), set()
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in _SPLITS:
            v = n.args[0].meta.get("val")
            at = 1 if n.target in (aten.slice.Tensor, aten.narrow.default) else 2
            dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", 0)
            if isinstance(v, torch.Tensor) and dim % v.dim() == v.dim() - 1 \
                    and v.shape[-1] == width:
                return True
        if n.target in _RESHAPES or n.target in (aten.view.default, aten.transpose.int,
                                                  aten.permute.default):
            stack.extend(n.users)
    return False


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


def _module_node(gm: fx.GraphModule, mod: torch.nn.Module, stem: str, arg: fx.Node,
                 like: fx.Node, args: tuple | None = None) -> fx.Node:
    """Call ``mod`` on ``arg`` (or ``args``), registered beside the weight ``like`` reads
    (so it belongs to the same block)."""
    weight = next(a for a in like.args if isinstance(a, fx.Node) and a.op == "get_attr")
    path = f"{weight.target.rpartition('.')[0]}.{stem}"
    gm.add_submodule(path, mod)
    node = gm.graph.call_module(path, args if args is not None else (arg,))
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "val")}
    if stem == "tp_copy":
        node.meta["val"] = arg.meta.get("val")
    return node


def _fix_shapes(gm: fx.GraphModule, tp: int) -> set[str]:
    """Run the sharded graph on fake tensors, rewriting the shape arguments of reshapes
    and expands whose input lost a factor to sharding. Returns the parameters read by an
    op that takes sharded activations; refuses a reduction over a sharded feature dim
    (a norm over all heads' features), which no rank can compute from its slice."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, object] = {}
    shrunk: set[fx.Node] = set()  # nodes whose value tp sharding made smaller
    on_shards: set[str] = set()

    def val(a: object) -> object:
        return fx.node.map_arg(a, lambda n: env[n])

    with mode:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = n.meta["val"]
                env[n] = torch.empty(v.shape, dtype=v.dtype, device=v.device)
            elif n.op == "get_attr":
                env[n] = mode.from_tensor(_attr(gm, n.target))
            elif n.op == "call_module":
                sub = gm.get_submodule(n.target)
                if isinstance(sub, (CopyToTP, ReduceFromTP)):
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
                                                 tuple(n.meta["val"].shape), list(n.args[1])),
                                  *n.args[2:])
                    elif n.target == aten.expand.default:
                        n.args = (inp, _expanded(tuple(old.shape), tuple(new.shape),
                                                 list(n.args[1]), tp), *n.args[2:])
                _check_reduction(n, env)
                try:
                    env[n] = n.target(*val(n.args), **val(n.kwargs))
                except Exception as e:
                    mod = _module_path(n)
                    raise CollieError(
                        f"tensor_parallel: after sharding, {n.name} ({n.target}) in module "
                        f"{mod!r} fails on the local shapes: {str(e).splitlines()[0]}; this "
                        "model's layout is not supported with tp>1") from e
            if n.op in ("call_function", "call_module") and any(
                    a in shrunk for a in n.all_input_nodes):
                on_shards.update(a.target for a in n.all_input_nodes if a.op == "get_attr")
            new, old = env.get(n), n.meta.get("val")
            if (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)
                    and tuple(new.shape) != tuple(old.shape)):
                shrunk.add(n)
    return {t for t in on_shards if isinstance(_attr(gm, t), torch.nn.Parameter)}


# Reductions over a dim: (op, index of its dims argument or None for the last dim).
_REDUCTIONS = {
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.var_mean.correction: 1,
    aten.var.correction: 1, aten.amax.default: 1, aten.norm.ScalarOpt_dim: 2,
    aten.linalg_vector_norm.default: 2, aten.layer_norm.default: None,
    aten.native_layer_norm.default: None, aten.rms_norm.default: None,
}


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


def _reshaped(old_in: tuple, new_in: tuple, old_out: tuple, arg: list) -> list:
    """Shape argument of a reshape whose input shrank from ``old_in`` to ``new_in``: each
    output dim takes the factor its input dims lost (the outermost one of a split dim,
    which is the head count since shards are whole heads)."""
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
        d = next(k for k in go if out[k] % lost == 0 and out[k] > 1)
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
