"""LOMO update (Lv et al. 2023): plain SGD applied inside the backward pass.

    p ← p·(1 - lr·wd) - lr·ĝ    (ĝ: gradient after loss-scale removal and clipping)

``lomo_update_reference`` is the plain-torch rule (math in fp32, in place); the Triton
kernel lands beside it.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def lomo_update_reference(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float = 0.0,
                          grad_scale: float = 1.0) -> None:
    """``p`` in place; ``g`` is divided by ``grad_scale`` (the loss scale, clip factor)."""
    if p.dtype == torch.float32:
        p.mul_(1 - lr * wd).add_(g, alpha=-lr / grad_scale)
    else:  # 16-bit weights: do the math in fp32, one tensor at a time
        p.copy_(p.float().mul_(1 - lr * wd).add_(g.float(), alpha=-lr / grad_scale))
