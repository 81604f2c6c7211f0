"""Expand grouped K/V for devices with no fused grouped-query attention kernel.

Rewrites each ``scaled_dot_product_attention(..., enable_gqa=True)`` into a call of
:func:`collie_compile.models.attention.expanded_sdpa` with the same arguments, which repeats K/V
for every query head and calls SDPA without groups. Assumes nothing else about the
graph; calls without ``enable_gqa`` are left alone. Apply it where
:func:`collie_compile.models.attention.fused_gqa` is false for the run's device and dtype, so
SDPA takes a fused kernel instead of its math path.
"""

from __future__ import annotations

import torch
from torch import fx

from collie_compile.models.attention import expanded_sdpa

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def expand_grouped_kv(gm: fx.GraphModule) -> fx.GraphModule:
    """Route grouped-query SDPA calls through :func:`expanded_sdpa`, in ``gm`` and the
    graph modules nested in it."""
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        changed = False
        for n in mod.graph.nodes:
            if n.op == "call_function" and n.target is _SDPA and n.kwargs.get("enable_gqa"):
                n.target = expanded_sdpa
                changed = True
        if changed:
            mod.recompile()
    return gm
