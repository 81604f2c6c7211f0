"""Writing fp32 results into 16-bit weights: round to nearest, or stochastically.

Stochastic rounding picks one of the two representable neighbours of x with probability
proportional to closeness, so E[round(x)] = x: tiny updates (lr·g far below a bf16
weight's ulp) survive on average instead of being rounded away every step. That is what
lets LOMO train 16-bit weights without an fp32 master copy.

lo = x rounded toward zero; hi = the next value away from zero (bits + 1 in the
sign-magnitude encoding); P(hi) = (x - lo) / (hi - lo). The same rule for bf16 and fp16.
``store_rounded`` is the Triton helper the update kernels call; ``round_to`` its torch
reference (the two draw different random numbers, so tests compare them in distribution).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@triton.jit
def store_rounded(ptr, offs, x, mask, seed, STOCHASTIC: tl.constexpr):
    """Store fp32 ``x`` at ``ptr + offs`` in ``ptr``'s dtype."""
    ty = ptr.dtype.element_ty
    if STOCHASTIC:
        lo = x.to(ty, fp_downcast_rounding="rtz")
        hi = (lo.to(tl.int16, bitcast=True) + 1).to(ty, bitcast=True)
        lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
        up = tl.rand(seed, offs) < (x - lo32) / (hi32 - lo32)
        tl.store(ptr + offs, tl.where(up, hi, lo), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ty), mask=mask)


def round_to(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``x`` in ``dtype``: nearest, or stochastically rounded for bf16/fp16."""
    if not stochastic or dtype not in SIXTEEN_BIT:
        return x.to(dtype)
    lo = x.to(dtype)  # nearest; step back toward zero where that rounded away from it
    away = lo.float().abs() > x.abs()
    lo = torch.where(away, (lo.view(torch.int16) - 1).view(dtype), lo)
    hi = (lo.view(torch.int16) + 1).view(dtype)
    lo32, hi32 = lo.float(), hi.float()
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < (x - lo32) / (hi32 - lo32), hi, lo)


def check_stochastic(p: torch.Tensor, stochastic: bool) -> bool:
    """Stochastic rounding applies to 16-bit weights only; fp32 weights ignore the flag."""
    return stochastic and p.dtype in SIXTEEN_BIT
