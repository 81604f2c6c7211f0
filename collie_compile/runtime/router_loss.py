"""The routers' auxiliary (load-balancing) loss, as the model's family computes it.

With ``output_router_logits=True`` a transformers mixture of experts adds
``router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k,
attention_mask)`` to the loss of each forward call. That loss is not a sum over tokens:
it multiplies each expert's share of the routed rows by its mean router probability, over
the rows of the call. So it is computed here over the rows transformers computes it over
in the same training setup: one micro-batch of one data-parallel rank (a forward call of
HF under gradient accumulation and DDP), padding masked out, and the step's loss adds the
mean over the step's micro-batches. With one micro-batch in all, the loss is the HF
model's ``loss`` on the whole batch. The function is the family's own (its modeling
module's ``load_balancing_loss_func``), read from the model, not written again here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from collie_compile.errors import CollieError


@dataclass(frozen=True)
class RouterLoss:
    """``coef * fn(router_logits, num_experts, top_k, mask)`` of one micro-batch."""

    fn: Callable[..., torch.Tensor]
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits: Sequence[torch.Tensor], mask: torch.Tensor
                 ) -> torch.Tensor:
        """The weighted loss of one micro-batch: ``router_logits`` (one [rows, experts]
        tensor per MoE layer, rows in [batch, seq] order) and ``mask`` [batch, seq]
        (1 where the token is real)."""
        return self.coef * self.fn(tuple(router_logits), self.num_experts, self.top_k, mask)


def router_loss(model: torch.nn.Module) -> RouterLoss | None:
    """The router loss ``model`` adds to its loss, or None where it adds none (its config
    does not set ``output_router_logits``)."""
    if not getattr(getattr(model, "config", None), "output_router_logits", False):
        return None
    fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    coef = getattr(model, "router_aux_loss_coef", getattr(model, "aux_loss_coef", None))
    values = [getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None),
              coef]  # JetMoe names its coefficient aux_loss_coef
    if fn is None or None in values:
        raise CollieError(f"{type(model).__name__} sets output_router_logits but its "
                          "router loss is not transformers' load_balancing_loss_func of "
                          "(num_experts, num_experts_per_tok, router_aux_loss_coef): "
                          "collie-compile cannot compute it; set output_router_logits="
                          "false in its config")
    experts, top_k, coef = values
    return RouterLoss(fn, int(experts), int(top_k), float(coef))
