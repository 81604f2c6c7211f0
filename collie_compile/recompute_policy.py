"""Activation recomputation policies.

``full`` checkpoints each decoder block: only its input is kept, the rest recomputed in
backward. ``selective`` keeps the outputs of matmuls and attention (expensive to redo)
and recomputes everything else (norms, activations, rotary, casts: cheap, memory-heavy).
The cost model counts exactly these tensors (:mod:`collie_compile.cost.profile`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten

# Ops whose outputs selective recomputation keeps (dispatcher-level names).
SAVED_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple:
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` (selective policy)."""
    return create_selective_checkpoint_contexts(_policy)


def checkpoint_kwargs(mode: str) -> dict | None:
    """Keyword arguments for torch's checkpoint under ``mode`` (None: no recomputation)."""
    if mode == "none":
        return None
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context
    return kwargs


def enable_on_hf_model(model: torch.nn.Module, mode: str) -> None:
    """Turn on recomputation of every decoder block of a transformers model, through its
    own activation-checkpointing API."""
    kwargs = checkpoint_kwargs(mode)
    if kwargs is None:
        return
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers (5.17 has only this name)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


