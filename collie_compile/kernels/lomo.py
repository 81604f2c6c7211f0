"""LOMO update (Lv et al. 2023): plain SGD applied inside the backward pass.

    p ← p·(1 - lr·wd) - lr·ĝ,   ĝ = g / grad_scale   (loss scale and clipping folded in)

One pass: read p, g; write p (6 bytes per bf16 parameter). Math in fp32; in place; 16-bit
weights are rounded to nearest or, with ``stochastic=True``, stochastically
(:mod:`.rounding`). ``lomo_update`` runs the kernel on CUDA and the reference elsewhere;
tests run the kernel through Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import AUTOTUNE_BLOCKS, INTERPRET_BLOCK, interpreting, slices, use_kernel
from .rounding import check_stochastic, round_to, store_rounded


@triton.jit
def _lomo_kernel(p_ptr, g_ptr, n, lr, wd, inv_scale, seed, STOCHASTIC: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * (1 - lr * wd) - lr * (g * inv_scale)
    store_rounded(p_ptr, offs, p, mask, seed, STOCHASTIC)


@functools.cache
def _autotuned() -> triton.runtime.Autotuner:
    # restore_value: autotuning must not apply the update once per config tried.
    return triton.autotune([triton.Config({"BLOCK": b}) for b in AUTOTUNE_BLOCKS], key=["n"],
                           restore_value=["p_ptr"])(_lomo_kernel)


def lomo_update_triton(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float = 0.0,
                       grad_scale: float = 1.0, stochastic: bool = False,
                       seed: int = 0) -> None:
    assert p.is_contiguous() and g.is_contiguous() and p.shape == g.shape
    n, sr = p.numel(), check_stochastic(p, stochastic)
    if interpreting():
        grid = (triton.cdiv(n, INTERPRET_BLOCK),)
        _lomo_kernel[grid](p, g, n, lr, wd, 1.0 / grad_scale, seed, sr, BLOCK=INTERPRET_BLOCK)
    else:
        _autotuned()[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            p, g, n, lr, wd, 1.0 / grad_scale, seed, sr)


@torch.no_grad()
def lomo_update_reference(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float = 0.0,
                          grad_scale: float = 1.0, stochastic: bool = False,
                          generator: torch.Generator | None = None) -> None:
    """``p`` in place; ``g`` is divided by ``grad_scale`` (the loss scale, clip factor)."""
    if p.dtype == torch.float32:
        p.mul_(1 - lr * wd).add_(g, alpha=-lr / grad_scale)
    else:  # 16-bit weights: do the math in fp32, one tensor at a time
        new = p.float().mul_(1 - lr * wd).add_(g.float(), alpha=-lr / grad_scale)
        p.copy_(round_to(new, p.dtype, stochastic, generator))


def lomo_update(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float = 0.0,
                grad_scale: float = 1.0, stochastic: bool = False, seed: int = 0) -> None:
    """The kernel where it runs, the reference elsewhere."""
    if use_kernel(p) and p.is_contiguous() and g.is_contiguous():
        lomo_update_triton(p, g, lr, wd, grad_scale, stochastic, seed)
    elif stochastic:  # one draw of the rounding noise over the whole tensor
        gen = torch.Generator(p.device).manual_seed(seed)
        lomo_update_reference(p, g, lr, wd, grad_scale, stochastic, gen)
    else:
        for ps, gs in slices(p, g):
            lomo_update_reference(ps, gs, lr, wd, grad_scale)
