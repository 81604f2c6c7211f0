"""LoRA as a graph rewrite, composable with tensor parallelism.

Beside every linear whose module matches a ``peft.LoraConfig``'s ``target_modules``
(peft's own matcher decides), the pass adds ``scaling * B(A(dropout(x)))`` with
``A: [r, in]`` and ``B: [out, r]`` registered at ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` (peft's names less the adapter name). Base weights are
frozen. Run after :mod:`.tensor_parallel`; the adapters follow their base weight:

- column-parallel base: B takes the same output rows, A is whole on every rank; the
  branch reads the base's tp-copied input, so no new collective in forward. A's
  gradient is a partial sum over the tp ranks' output slices (``partial_grads``).
- row-parallel base: A takes the same input columns, B is whole; the branch's partial
  output joins the base's before its all-reduce, so one all-reduce sums both. B's
  gradient is a partial sum over tp (``partial_grads``).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from collie_compile.errors import CollieError

from .tensor_parallel import linear_operands, tp_record

aten = torch.ops.aten


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` is one of the adapters this pass adds."""
    return ".lora_A." in name or ".lora_B." in name


def init_adapter(in_features: int, out_features: int, rank: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's default init: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B zeros."""
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen)
    return a, torch.zeros(out_features, rank)


def lora(gm: fx.GraphModule, config: object, tp: int = 1,
         init: dict[str, torch.Tensor] | None = None, seed: int = 0, tp_rank: int = 0
         ) -> fx.GraphModule:
    """Insert LoRA branches for ``config`` (a ``peft.LoraConfig``). ``init`` maps adapter
    names (``<module>.lora_A.weight``) to full tensors, e.g. from a saved PEFT adapter;
    missing ones get peft's default init. Adds the adapters' shards and partial
    gradients to the graph's :func:`~collie_compile.passes.tensor_parallel.tp_record`."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise CollieError("DoRA and LoRA biases are not supported; use plain LoRA")
    if getattr(config, "target_parameters", None):
        # peft >= 0.21 puts them on a mixture of experts' router weight and fused experts
        # for target_modules="all-linear"; training without them would not be that adapter
        raise CollieError(f"LoRA on parameters (target_parameters="
                          f"{sorted(config.target_parameters)}: a router's weight or fused "
                          "experts) is not built yet; target linear modules by name, e.g. "
                          "q_proj, k_proj, v_proj, o_proj")
    record = tp_record(gm)
    shards, partial = record.shards, record.partial_grads
    adapters: dict[str, str] = {}
    linears: set[str] = set()  # the model's own names, for the error below
    gen = torch.Generator().manual_seed(seed)
    r = int(config.r)
    scaling = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
    for lin in list(gm.graph.nodes):
        operands = linear_operands(lin)
        if operands is None:
            continue
        x, w_name, out_dim, _ = operands
        module = w_name.rpartition(".")[0]
        linears.add(module.rpartition(".")[2])
        if not check_target_module_exists(config, module):
            continue
        weight = gm.get_parameter(w_name)
        shard = shards.get(w_name)
        full_out, full_in = weight.shape[out_dim], weight.shape[1 - out_dim]
        if shard is not None:
            full_out, full_in = ((shard.size, full_in) if shard.dim == out_dim
                                 else (full_out, shard.size))
        a_full, b_full = init_adapter(full_in, full_out, r, gen)
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a_full = (init or {}).get(a_name, a_full)
        b_full = (init or {}).get(b_name, b_full)
        if tuple(a_full.shape) != (r, full_in) or tuple(b_full.shape) != (full_out, r):
            raise CollieError(f"adapter for {module} has shapes {list(a_full.shape)} / "
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
        mod = gm.get_submodule(module)
        # a base on the meta device is read from a checkpoint later; the adapters it has
        # no copy of keep this init
        device = "cpu" if weight.is_meta else weight.device
        for name, t in (("lora_A", a), ("lora_B", b)):
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(t.to(weight.dtype).to(device).clone())
            mod.add_module(name, holder)
        weight.requires_grad_(False)
        _insert_branch(gm, lin, x, a_name, b_name, scaling, float(config.lora_dropout))
        adapters[a_name] = adapters[b_name] = w_name
    if not adapters:
        raise CollieError(f"no linear matches target_modules={config.target_modules!r}; "
                          f"this model's linears are {', '.join(sorted(linears))}")
    _refuse_missed(gm, config, {w.rpartition(".")[0] for w in adapters.values()},
                   set(init or {}) - set(adapters))
    for name, p in gm.named_parameters():
        p.requires_grad_(name in adapters)
    gm.graph.lint()
    gm.recompile()
    return gm


def _refuse_missed(gm: fx.GraphModule, config: object, adapted: set[str],
                   unplaced: set[str]) -> None:
    """Refuse, rather than train a different adapter than peft's: a targeted module with a
    2-D weight whose linear the graph does not show as one (a router computing its
    logits from a cast copy of its weight), or a given adapter tensor no linear took."""
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = {n.rpartition(".")[0] for n, p in gm.named_parameters()
               if n.endswith(".weight") and p.dim() == 2}
    missed = sorted(m for m in modules - adapted if check_target_module_exists(config, m))
    if missed or unplaced:
        what = missed[0] if missed else sorted(unplaced)[0]
        raise CollieError(f"LoRA on {what} cannot be built here: its weight reaches the "
                          "graph other than as a plain linear's (peft would adapt it); "
                          f"leave {what.rpartition('.')[2] if missed else 'it'} out of "
                          "the target modules")


def _insert_branch(gm: fx.GraphModule, lin: fx.Node, x: fx.Node, a_name: str,
                   b_name: str, scaling: float, dropout: float) -> None:
    """``lin + scaling * B(A(dropout(x)))`` for ``lin`` reading ``x``; every user of
    ``lin`` (a tp all-reduce included) reads the sum instead."""
    g = gm.graph
    inp = x
    with g.inserting_before(lin.next):
        if dropout:
            x = g.call_function(aten.dropout.default, (x, dropout, True))
        a = g.get_attr(a_name)
        b = g.get_attr(b_name)
        h = g.call_function(aten.linear.default, (x, a))
        low = g.call_function(aten.linear.default, (h, b))
        y = g.call_function(aten.mul.Tensor, (low, scaling))
        out = g.call_function(aten.add.Tensor, (lin, y))
    for n in (x, h, low, y, out):
        if isinstance(n, fx.Node) and n is not inp:
            n.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    out.meta["val"] = lin.meta.get("val")
    lin.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
