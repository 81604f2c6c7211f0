"""Cut a run of nodes out of a graph into a GraphModule of its own.

The pipeline split and the block outlining both need the same thing: a set of nodes,
the values flowing in (placeholders of the new graph) and the values flowing out (its
outputs). Attributes the nodes read (parameters, buffers, submodules) keep their fully
qualified names in the new module, so checkpoints and optimizers see the same names
before and after a pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx


def live_in(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """Values the nodes use that are computed outside them (attributes excluded), in
    graph order."""
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                seen[a] = None
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def live_out(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """Values computed by the nodes and used after them."""
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient leaves contiguous."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, its gradient made contiguous: a pipeline stage sends its inputs' gradients
    back, into buffers shaped by their strides, which must be contiguous (the gradient of
    one part of a concatenation is a strided view of the whole's)."""
    return _ContiguousGrad.apply(x)


def extract(root: torch.nn.Module, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
            outputs: Sequence[fx.Node] | fx.Node | tuple, name: str = "subgraph",
            contiguous_outputs: bool = False, contiguous_input_grads: bool = False
            ) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` with copies of ``nodes``.

    ``outputs`` is a node, or a (nested) tuple of nodes returned as is. Attributes the
    nodes read are taken from ``root`` under the same names. With ``contiguous_outputs``
    every returned tensor is made contiguous, with ``contiguous_input_grads`` every
    tensor input's gradient (point-to-point sends and receives need both).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in inputs:
        ph = graph.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph
    if contiguous_input_grads:
        for inp in inputs:
            v = inp.meta.get("val")
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                env[inp] = graph.call_function(contiguous_grad, (env[inp],))
                env[inp].meta = {"val": v}  # in no block: it belongs to the boundary

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise RuntimeError(f"{name}: node {a.name} is used but neither computed in "
                                  "the subgraph nor passed in; the cut is not valid")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)

    def out(x: object) -> object:
        if isinstance(x, fx.Node):
            v = lookup(x)
            if contiguous_outputs and isinstance(x.meta.get("val"), torch.Tensor):
                v = graph.call_method("contiguous", (v,))
            return v
        if isinstance(x, (tuple, list)):
            return type(x)(out(y) for y in x)
        return x

    graph.output(out(outputs))
    graph.lint()
    return fx.GraphModule(root, graph, class_name=name)
