"""AdaLomo update (Lv et al. 2023): LOMO with a factored second moment.

For a matrix gradient G (m x n), with β = 1 - t^-0.8 at step t:
    r ← β·r + (1-β)·rowmean(G² + ε₁);   c ← β·c + (1-β)·colmean(G² + ε₁)
    U = G / sqrt(r·cᵀ / mean(r));        U ← U / max(1, RMS(U))
    p ← p·(1 - η·wd) - η·U,              η = lr·max(ε₂, RMS(p))
Vectors keep a full second moment v instead of r and c. ε₁ = 1e-30, ε₂ = 1e-3.

``adalomo_update_reference`` is the plain-torch rule (fp32 math, in place); the fused
Triton kernel (two passes: statistics, then update) is still to come.
"""

from __future__ import annotations

import torch

EPS1 = 1e-30
EPS2 = 1e-3


def adalomo_state(p: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Fresh fp32 state for ``p``: row and column statistics, or a full moment."""
    if p.dim() == 2:
        return {"step": 0, "row": torch.zeros(p.shape[0], device=p.device),
                "col": torch.zeros(p.shape[1], device=p.device)}
    return {"step": 0, "v": torch.zeros(p.shape, device=p.device)}


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


@torch.no_grad()
def adalomo_update_reference(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                             wd: float = 0.0) -> None:
    """Update ``p`` and ``state`` in place from gradient ``g``."""
    state["step"] += 1
    beta = 1.0 - state["step"] ** -0.8
    g = g.float()
    sq = g.pow(2).add_(EPS1)
    if p.dim() == 2:
        row, col = state["row"], state["col"]
        row.mul_(beta).add_(sq.mean(1), alpha=1 - beta)
        col.mul_(beta).add_(sq.mean(0), alpha=1 - beta)
        second = torch.outer(row, col).div_(row.mean())
    else:
        state["v"].mul_(beta).add_(sq, alpha=1 - beta)
        second = state["v"]
    u = g / second.sqrt()  # not in place: g may be the caller's gradient
    u.div_(torch.clamp(_rms(u), min=1.0))
    w = p.float()
    eta = lr * max(EPS2, _rms(w).item())
    p.copy_(w.mul_(1 - eta * wd).add_(u, alpha=-eta))
