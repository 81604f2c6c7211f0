"""Return each router's logits beside the logits, for the router's auxiliary loss.

A mixture of experts whose config sets ``output_router_logits`` returns, captured as
transformers runs it, ``(aux_loss, logits, router_logits...)``: its forward computes the
load-balancing loss over the rows of that one call, unmasked (the rank program is called
without ``attention_mask``). The runtime computes that loss itself, per micro-batch and
with the batch's padding mask, by the family's own function
(:mod:`collie_compile.runtime.router_loss`); so this pass rewrites the output to
``(logits, *router_logits)`` and removes the in-graph loss, which nothing then uses.
Assumes the graph as :func:`~collie_compile.capture.export.capture_static` leaves it (its
output flattened from the model's output class); a graph without router logits is
returned unchanged.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

_ASSERT = torch.ops.aten._assert_tensor_metadata.default


def router_outputs(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` returning ``(logits, *router_logits)`` where it returns router logits."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None or "router_logits" not in (spec.context or ()):
        return gm
    output = next(n for n in gm.graph.nodes if n.op == "output")
    fields = pytree.tree_unflatten(list(output.args[0]), spec)
    routers = tuple(fields.router_logits)
    output.args = ((fields.logits, *routers),)
    gm._out_spec = pytree.tree_structure((0, *range(len(routers))))
    gm.graph._codegen.pytree_info = gm.graph._codegen.pytree_info._replace(
        out_spec=gm._out_spec)
    gm.graph.eliminate_dead_code()
    # export's dtype/device asserts keep the dropped loss's ops alive: drop the asserts
    # on values nothing else reads, then what only they read
    while dead := [n for n in gm.graph.nodes if n.target is _ASSERT and len(n.args[0].users) == 1]:
        for n in dead:
            gm.graph.erase_node(n)
        gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
