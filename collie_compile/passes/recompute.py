"""Activation recomputation of the blocks a plan marks.

Rewrites each call of an outlined block (see :mod:`.outline_blocks`) whose mode is
``full`` or ``selective`` into a call through :func:`torch.utils.checkpoint.checkpoint`
(non-reentrant; ``selective`` keeps matmul and attention outputs, as the cost model
counts in :mod:`collie_compile.recompute_policy`). Blocks marked ``none`` are left alone.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint

from collie_compile.recompute_policy import checkpoint_kwargs

from .outline_blocks import node_block


def run_checkpointed(block: torch.nn.Module, mode: str, *args: object) -> object:
    """Call ``block(*args)`` keeping only what ``mode`` says for backward."""
    return checkpoint(block, *args, **checkpoint_kwargs(mode))


def recompute(gm: fx.GraphModule, prefix: str, modes: list[str]) -> fx.GraphModule:
    """Route calls of block ``i`` through :func:`run_checkpointed` when ``modes[i]`` is not
    ``"none"``. Assumes blocks were outlined into submodules at ``prefix + str(i)``."""
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not str(n.target).startswith(prefix):
            continue
        b = node_block(n, prefix)
        if b is None or b >= len(modes):
            continue
        mode = modes[b]
        if mode not in ("none", "selective", "full"):
            raise RuntimeError(f"unknown recompute mode {mode!r} for block {b}; "
                              "use none, selective or full")
        if mode == "none":
            continue
        with gm.graph.inserting_before(n):
            block = gm.graph.get_attr(n.target)
            call = gm.graph.call_function(run_checkpointed, (block, mode, *n.args))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm
