"""IA3 as a graph rewrite, composable with tensor parallelism.

peft's (IA)³ learns one vector per targeted linear (a ``peft.IA3Config``'s
``target_modules``, matched by peft's own matcher): it scales the linear's output,
``y · l`` with ``l: [out, 1]``, or for the config's ``feedforward_modules`` its input,
``W (x · l)`` with ``l: [1, in]``. The vector is registered at ``<module>.ia3_l`` (peft's
name less the adapter name), starts at ones, and is all that trains.

Run after :mod:`.tensor_parallel`. A vector along features the base splits over tp
(its output rows under a column-parallel base, its input columns under a row-parallel
one) is split the same way; one along whole features is whole on every rank, and its
gradient is a partial sum over tp (``partial_grads``): each rank sees only its slice of
what the scaled features feed.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from collie_compile.errors import CollieError

from .lora import finish_adapters
from .tensor_parallel import linear_operands, tp_record

aten = torch.ops.aten


def is_feedforward(config: object, module: str) -> bool:
    """Whether peft scales ``module``'s input (its ``feedforward_modules``), not output."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, module))
    return any(module.endswith(k) for k in ff or ())


def ia3(gm: fx.GraphModule, config: object, tp: int = 1,
        init: dict[str, torch.Tensor] | None = None, tp_rank: int = 0) -> fx.GraphModule:
    """Scale each targeted linear of ``config`` (a ``peft.IA3Config``, defaults filled
    in) by its vector, from ``init`` (whole tensors by name, e.g. a saved adapter) or
    ones. Records splits and partial gradients in :func:`.tensor_parallel.tp_record`."""
    from peft.tuners.tuners_utils import check_target_module_exists

    record = tp_record(gm)
    shards, partial = record.shards, record.partial_grads
    adapted: dict[str, str] = {}
    linears: set[str] = set()
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
        full = [weight.shape[out_dim], weight.shape[1 - out_dim]]  # out, in
        if shard is not None:
            full[0 if shard.dim == out_dim else 1] = shard.size
        ff = is_feedforward(config, module)
        shape = (1, full[1]) if ff else (full[0], 1)
        name = f"{module}.ia3_l"
        vec = (init or {}).get(name, torch.ones(shape))
        if tuple(vec.shape) != shape:
            raise CollieError(f"IA3 vector {name} has shape {list(vec.shape)}, expected "
                              f"{list(shape)}: is the adapter for this model?")
        # split with the features it scales: outputs (column-parallel) or inputs (row)
        split_here = shard is not None and (shard.dim == out_dim) != ff
        if split_here:
            shards[name] = shard.along(1 if ff else 0)
            vec = shards[name].take(vec, tp_rank)
        elif shard is not None:
            partial[name] = [list(range(tp))]
        gm.get_submodule(module).register_parameter(
            "ia3_l", torch.nn.Parameter(vec.to(weight.dtype).to(
                "cpu" if weight.is_meta else weight.device).clone()))
        weight.requires_grad_(False)
        _insert_scale(gm, lin, x, name, ff)
        adapted[name] = w_name
    return finish_adapters(gm, config, adapted, init or {}, linears)


def _insert_scale(gm: fx.GraphModule, lin: fx.Node, x: fx.Node, name: str, ff: bool) -> None:
    """``lin``'s input (``ff``) or output times the flattened vector ``name``."""
    g = gm.graph
    with g.inserting_before(lin if ff else lin.next):
        vec = g.get_attr(name)
        flat = g.call_function(aten.reshape.default, (vec, [-1]))
        out = g.call_function(aten.mul.Tensor, (x if ff else lin, flat))
    for n in (vec, flat, out):
        n.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    if ff:
        out.meta["val"] = x.meta.get("val")
        lin.replace_input_with(x, out)
    else:
        out.meta["val"] = lin.meta.get("val")
        lin.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
