"""Routed experts on the device's fused grouped GEMM where it has one.

Rank programs are captured on the CPU or the meta device, where a mixture of experts'
grouped products trace as transformers' per-expert fallback op
(``transformers.grouped_mm_fallback``, a loop over experts). This pass points each such
call at :func:`collie_compile.models.experts.grouped_mm`, which takes torch's fused
``grouped_mm`` where the operands allow it (CUDA, bf16, sm80+, 16-byte rows) and calls
the same fallback op elsewhere, so on the CPU nothing changes. Walks ``gm`` and the graph
modules nested in it (outlined blocks); assumes nothing else of the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from collie_compile.models.experts import grouped_mm


def fused_grouped_experts(gm: fx.GraphModule) -> fx.GraphModule:
    """Each per-expert fallback call in ``gm`` made a :func:`grouped_mm` call."""
    fallback = torch.ops.transformers.grouped_mm_fallback.default
    for mod in gm.modules():
        if isinstance(mod, fx.GraphModule):
            hits = [n for n in mod.graph.nodes
                    if n.op == "call_function" and n.target is fallback]
            for n in hits:
                n.target = grouped_mm
            if hits:
                mod.recompile()
    return gm
