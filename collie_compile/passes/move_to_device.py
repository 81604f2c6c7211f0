"""Point a captured graph at the device it will run on.

A graph captured on one device (CPU, or meta for a model too big to materialise) bakes
that device into the ops that create tensors (``arange``, ``new_ones``, ``to.device``).
This pass rewrites every device constant to ``device``; parameters and buffers are moved
by the caller.
"""

from __future__ import annotations

import torch
from torch import fx


def move_to_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """Replace each ``torch.device`` in node arguments by ``device``, in ``gm`` and in the
    graph modules nested in it (outlined blocks)."""
    def swap(a: object) -> object:
        if isinstance(a, torch.device):
            return device
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        if isinstance(a, dict):
            return {k: swap(v) for k, v in a.items()}
        return a

    for mod in gm.modules():
        if isinstance(mod, fx.GraphModule):
            for n in mod.graph.nodes:
                if n.op == "call_function":
                    n.args, n.kwargs = swap(n.args), swap(n.kwargs)
            mod.recompile()
    return gm
