"""Expert parallelism as a graph rewrite: each rank of an ``ep`` group holds 1/ep of every
layer's routed experts, and tokens travel to their experts and back by all-to-all.

A mixture-of-experts layer captured through :mod:`collie_compile.models.experts` runs its
experts between two marker ops, ``collie::expert_dispatch`` (rows sorted by expert, with
each expert's row count) and ``collie::expert_combine`` (the experts' output rows). The
pass

- replaces each experts module's 3-D weights and biases ([experts, ...]) by this rank's
  experts, rank r holding experts r·E/ep to (r+1)·E/ep - 1 (a dim-0 :class:`Shard`);
- replaces the dispatch marker by :class:`~collie_compile.passes.collectives.ExpertDispatch`
  (row counts exchanged, then the rows, put in order of local expert) and the combine
  marker by :class:`~collie_compile.passes.collectives.ExpertCombine` (the results back in
  the order they left).

It assumes every rank of the group runs the same graph on its own tokens (the ep group is
carved from the data-parallel ranks): all of them reach each layer's all-to-all in the
same order. The router, the routing weights and shared experts stay as they are, on each
rank's own tokens. Expert gradients come back complete for this rank's experts over the
group's tokens; summing them over the ranks holding the same experts (expert data
parallelism) is the data-parallel pass's job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import fx

from collie_compile.errors import CollieError
from collie_compile.models import experts as _registers_the_marker_ops  # noqa: F401
from collie_compile.passes.collectives import ExpertCombine, ExpertDispatch
from collie_compile.passes.tensor_parallel import Shard

DISPATCH = torch.ops.collie.expert_dispatch.default
COMBINE = torch.ops.collie.expert_combine.default
_RECORD = "collie_expert_parallel"


def ep_record(gm: fx.GraphModule) -> dict[str, Shard]:
    """The expert weights :func:`expert_parallel` split (name -> its dim-0 shard); empty
    for a graph it never touched."""
    return gm.meta.setdefault(_RECORD, {})


def experts_module(n: fx.Node) -> str:
    """The path of the experts module a marker node was traced in."""
    return list(n.meta["nn_module_stack"].values())[-1][0]


def expert_parallel(gm: fx.GraphModule, group: dist.ProcessGroup | None, rank: int,
                    size: int) -> fx.GraphModule:
    """Split ``gm``'s routed experts over the ``size`` ranks of ``group`` (this one is
    ``rank``) and route tokens to them by all-to-all. ``size`` 1 leaves ``gm`` as it is."""
    if size == 1:
        return gm
    record = ep_record(gm)
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (DISPATCH, COMBINE):
            continue
        path = experts_module(n)
        if n.target == DISPATCH:
            experts = n.args[2].meta["val"].shape[0]
            if experts % size:
                raise CollieError(f"{path} has {experts} experts, which ep={size} does not "
                                  f"divide; pick an ep that divides {experts}")
            record.update(_take_experts(gm, path, experts, rank, size))
            mod, stem = ExpertDispatch(group, experts), "ep_dispatch"
        else:
            mod, stem = ExpertCombine(group), "ep_combine"
        gm.add_submodule(f"{path}.{stem}", mod)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(f"{path}.{stem}", n.args)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    if not record:
        raise CollieError(f"ep={size} asks for expert parallelism, but the model has no "
                          "routed experts; use ep=1")
    gm.graph.lint()
    gm.recompile()
    return gm


def _take_experts(gm: fx.GraphModule, path: str, experts: int, rank: int, size: int
                  ) -> dict[str, Shard]:
    """Keep this rank's experts of every [experts, ...] weight of module ``path``."""
    module, local = gm.get_submodule(path), experts // size
    shard = Shard(0, experts, tuple(((r * local, (r + 1) * local),) for r in range(size)))
    out = {}
    for leaf, p in list(module.named_parameters(recurse=False)):
        if p.dim() == 0 or p.shape[0] != experts:
            continue
        mine = p.detach()[rank * local:(rank + 1) * local].clone()
        setattr(module, leaf, torch.nn.Parameter(mine, requires_grad=p.requires_grad))
        out[f"{path}.{leaf}"] = shard
    return out
