"""How attention runs: SDPA told the mask is causal, grouped K/V left grouped where it can.

transformers materialises the causal mask when a model is exported (an exported graph
might later decode one token at a time, where ``is_causal`` would be wrong). A mask keeps
SDPA off its flash kernel and makes transformers copy K/V once per query group
(``repeat_kv``). We only train on whole sequences, so the ``collie_sdpa`` implementation,
registered through transformers' own AttentionInterface and AttentionMaskInterface,
replaces a plain causal mask by ``is_causal=True`` and hands grouped K/V to SDPA as they
are (``enable_gqa``). Padding, sliding windows shorter than the sequence and other masks
are left to transformers, and so are documents packed into a row (``position_ids`` that
restart per document): transformers' mask then keeps each document to itself.

Where no fused kernel takes grouped-query attention in a dtype (CUDA: flash needs 16 bits
and sm80+, the memory-efficient kernel takes no groups), SDPA would fall back to its math
path, which keeps the attention probabilities (heads x seq x seq per sequence) for
backward; there K/V are expanded first (:func:`expanded_sdpa`) so a fused kernel runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from collie_compile.dtypes import fused_gqa_dtypes, torch_dtype

IMPLEMENTATION = "collie_sdpa"


def fused_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA has a fused kernel for grouped-query attention on ``device`` in ``dtype``
    (meta, which only captures, counts as a CPU)."""
    return any(torch_dtype(name) == dtype for name in fused_gqa_dtypes(device))


def expanded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object,
                  **kwargs: object) -> torch.Tensor:
    """SDPA (same arguments) with K/V repeated for every query head instead of
    ``enable_gqa``: the form fused kernels without group support accept."""
    kwargs.pop("enable_gqa", None)
    groups = query.shape[-3] // key.shape[-3]
    return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, -3),
                                          value.repeat_interleave(groups, -3), *args, **kwargs)


def _mask(*, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
          use_vmap: bool = False, **kwargs: object) -> torch.Tensor | None:
    """The causal mask is ``is_causal`` when nothing narrows it: no padding mask, no
    sliding window or chunk (``local_size``) shorter than the sequence, no cached keys
    before the queries' (a prefix), no model-specific mask functions (which transformers
    evaluates with vmap). Under export transformers also folds in a check for packed
    sequences, which it cannot evaluate while tracing; a model given only input_ids
    numbers positions 0..s-1 per row: one sequence per row.
    Given ``position_ids`` (:func:`causal_attention`'s ``packed``), that check is the
    point: transformers' mask keeps each packed document to itself."""
    window_covers = local_size is None or statically_known_true(
        kwargs.get("kv_length", local_size + 1) <= local_size)
    # queries at the keys' own positions: not after a cache (prefix tuning's virtual keys
    # come first, and is_causal would align the mask at the top left, not the bottom)
    q_length = kwargs.get("q_length")
    if q_length is None and isinstance(kwargs.get("cache_position"), torch.Tensor):
        q_length = kwargs["cache_position"].shape[0]  # transformers before q_length
    aligned = q_length is None or "kv_length" not in kwargs or (
        not kwargs.get("q_offset") and statically_known_true(kwargs["kv_length"] == q_length))
    _STATE["causal_dropped"] = (attention_mask is None and window_covers and not use_vmap
                                and not _STATE["packed"] and aligned)
    if _STATE["causal_dropped"]:
        return None
    return sdpa_mask(attention_mask=attention_mask, local_size=local_size, use_vmap=use_vmap,
                     **kwargs)


# Whether the last causal mask was handed on as None (to become is_causal); whether the
# model being captured is given position_ids (packed documents: the mask is needed).
_STATE = {"causal_dropped": False, "packed": False}


class MaskRewrittenError(RuntimeError):
    """A model changed the causal mask it was handed as None."""


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: object
               ) -> tuple[torch.Tensor, None]:
    if attention_mask is not None and _STATE["causal_dropped"]:
        # The model made a mask of its own where we handed it None for the causal one
        # (Doge ranks keys on its dynamic mask): it needs the causal mask itself, so this
        # capture must fail, and capture falls back to the family's own SDPA path.
        raise MaskRewrittenError(f"{type(module).__name__} builds its own attention mask "
                                 "from the causal one; collie_sdpa cannot hand it is_causal")
    if (attention_mask is None and key.shape[1] != query.shape[1]
            and not fused_gqa(query.device, query.dtype)):
        out = expanded_sdpa(query, key, value, dropout_p=kwargs.get("dropout", 0.0),
                            scale=kwargs.get("scaling"),
                            is_causal=query.shape[2] > 1 and getattr(module, "is_causal", True))
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, _mask)


@contextlib.contextmanager
def causal_attention(model: torch.nn.Module, enabled: bool = True, packed: bool = False
                     ) -> Iterator[None]:
    """Run a transformers model that uses SDPA with ``collie_sdpa`` while inside (if
    ``enabled``); other implementations (eager, flash-attn) are the user's choice and
    stay. ``packed``: the model is given ``position_ids`` that may restart within a row,
    so the causal mask transformers builds from them is kept."""
    config = getattr(model, "config", None)
    # families with attention classes of their own (Falcon) keep their SDPA path
    if (not enabled or getattr(config, "_attn_implementation", None) != "sdpa"
            or not getattr(model, "_supports_attention_backend", False)):
        yield
        return
    model.set_attn_implementation(IMPLEMENTATION)
    _STATE["packed"] = packed
    try:
        yield
    finally:
        _STATE["packed"] = False
        model.set_attn_implementation("sdpa")
