"""Cut a graph into pipeline stages at block boundaries.

Stage ``k`` gets blocks ``stages[k][0] .. stages[k][1]``; what runs before the first
block (embedding, rotary tables, masks) joins stage 0 and what runs after the last block
(final norm, LM head) joins the last stage. Every value computed before a boundary and
used after it crosses it, so a stage passes on the values later stages need even when it
does not use them itself (the rotary tables and the mask travel with the hidden states,
and the router logits of earlier blocks on to the last stage, which returns them).
"""

from __future__ import annotations

from torch import fx

from collie_compile.errors import CollieError

from .outline_blocks import node_block
from .subgraph import extract


def pipeline_split(gm: fx.GraphModule, prefix: str, stages: list[list[int]]
                   ) -> list[fx.GraphModule]:
    """One GraphModule per stage. Stage 0 takes the graph's inputs; stage k > 0 takes
    stage k-1's outputs (a tuple of contiguous tensors, whose gradients it returns
    contiguous); the last stage returns the graph's output. Parameters keep their names
    in the stage that uses them."""
    stage_of: dict[int, int] = {}
    for k, (first, last) in enumerate(stages):
        for b in range(first, last + 1):
            stage_of[b] = k
    compute = [n for n in gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module")]
    assigned: dict[fx.Node, int] = {}
    current = 0
    for n in compute:
        b = node_block(n, prefix)
        if b is not None:
            if b not in stage_of:
                raise RuntimeError(f"block {b} is in no pipeline stage of {stages}")  # a bad plan
            current = max(current, stage_of[b])
        assigned[n] = max([current] + [assigned.get(a, 0) for a in n.all_input_nodes])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for n in placeholders:
        assigned[n] = 0

    last_stage = len(stages) - 1

    def later(user: fx.Node, k: int) -> bool:  # the output is the last stage's
        return last_stage > k if user is output else assigned[user] > k

    def crossing(k: int) -> list[fx.Node]:
        """Values made in stages <= k and used by a later stage (or the output)."""
        return [n for n in placeholders + compute if assigned[n] <= k and any(
            later(u, k) for u in n.users)]

    out = []
    for k in range(len(stages)):
        nodes = [n for n in compute if assigned[n] == k]
        ins = placeholders if k == 0 else crossing(k - 1)
        last = k == len(stages) - 1
        outs = output.args[0] if last else tuple(crossing(k))
        for v in (ins if k else []):
            if not hasattr(v.meta.get("val"), "shape"):
                raise CollieError(f"pipeline_split: {v.name} crosses stage {k - 1}->{k} but is "
                                  "not a tensor; capture with static shapes")
        out.append(extract(gm, nodes, ins, outs, name=f"Stage{k}", contiguous_outputs=not last,
                           contiguous_input_grads=k > 0))
    return out
