"""Lion update (Chen et al. 2023): sign of an interpolated momentum.

    c = β1·m + (1-β1)·g;  p ← p·(1 - lr·wd) - lr·sign(c);  m ← β2·m + (1-β2)·g

``lion_update_reference`` is the plain-torch rule (math in fp32, in place); the Triton
kernel that fuses it into one pass over memory lands beside it.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def lion_update_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float,
                          beta1: float = 0.9, beta2: float = 0.99, wd: float = 0.0) -> None:
    """Update fp32 ``p`` and momentum ``m`` in place from gradient ``g``."""
    g = g.float()
    c = m.mul(beta1).add_(g, alpha=1 - beta1)
    p.mul_(1 - lr * wd).add_(c.sign_(), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)
