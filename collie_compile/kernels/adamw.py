"""Adam and AdamW updates (Kingma & Ba 2015; Loshchilov & Hutter 2019), torch's rule:

    ĝ = g / grad_scale;  AdamW: p ← p·(1 - lr·wd);  Adam: ĝ ← ĝ + wd·p
    m ← m + (1-β1)·(ĝ - m);  v ← β2·v + (1-β2)·ĝ²
    p ← p - lr/(1-β1ᵗ) · m / (sqrt(v)/sqrt(1-β2ᵗ) + eps)

the same operations in the same order as ``torch.optim.AdamW``'s single-tensor path, so
fp32 results agree with it to rounding. One pass over memory: read p, g, m, v; write p, m,
v (28 bytes per fp32 parameter). Moments fp32; math in fp32 whatever p's dtype; in place.
``adamw_update`` runs the kernel on CUDA and the reference elsewhere; tests run the
kernel through Triton's interpreter. 16-bit ``p`` may be rounded stochastically.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import AUTOTUNE_BLOCKS, INTERPRET_BLOCK, interpreting, slices, use_kernel
from .rounding import check_stochastic, round_to, store_rounded


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr, wd, beta1, beta2, eps, step_size,
                  bc2_sqrt, inv_scale, seed, DECOUPLED: tl.constexpr,
                  STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if DECOUPLED:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    store_rounded(p_ptr, offs, p, mask, seed, STOCHASTIC)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@functools.cache
def _autotuned() -> triton.runtime.Autotuner:
    # restore_value: autotuning runs the kernel once per config; p, m and v must change once.
    return triton.autotune([triton.Config({"BLOCK": b}) for b in AUTOTUNE_BLOCKS], key=["n"],
                           restore_value=["p_ptr", "m_ptr", "v_ptr"])(_adamw_kernel)


def _scalars(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(lr / (1-β1ᵗ), sqrt(1-β2ᵗ)) as torch computes them (Python floats)."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adamw_update_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                        lr: float, beta1: float, beta2: float, eps: float, wd: float,
                        step: int, decoupled: bool = True, grad_scale: float = 1.0,
                        stochastic: bool = False, seed: int = 0) -> None:
    """Launch the kernel on contiguous ``p`` (any float dtype), ``g`` and fp32 ``m``, ``v``;
    ``step`` counts this update (1 on the first)."""
    assert p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
    assert m.dtype == v.dtype == torch.float32 and p.shape == g.shape == m.shape == v.shape
    n, sr = p.numel(), check_stochastic(p, stochastic)
    step_size, bc2_sqrt = _scalars(lr, beta1, beta2, step)
    args = (p, g, m, v, n, lr, wd, beta1, beta2, eps, step_size, bc2_sqrt, 1.0 / grad_scale,
            seed, decoupled, sr)
    if interpreting():
        _adamw_kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](*args, BLOCK=INTERPRET_BLOCK)
    else:
        _autotuned()[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args)


@torch.no_grad()
def adamw_update_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                           v: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                           wd: float, step: int, decoupled: bool = True,
                           grad_scale: float = 1.0, stochastic: bool = False,
                           generator: torch.Generator | None = None) -> None:
    """The same update in plain torch, in torch's own order of operations."""
    w = p if p.dtype == torch.float32 else p.float()
    g = g.float() if grad_scale == 1.0 else g.float().mul(1.0 / grad_scale)  # as the kernel
    if decoupled:
        w.mul_(1 - lr * wd)
    elif wd:
        g = g.add(w, alpha=wd)
    step_size, bc2_sqrt = _scalars(lr, beta1, beta2, step)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
    if w is not p:
        p.copy_(round_to(w, p.dtype, stochastic, generator))


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 lr: float, beta1: float, beta2: float, eps: float, wd: float, step: int,
                 decoupled: bool = True, grad_scale: float = 1.0, stochastic: bool = False,
                 seed: int = 0) -> None:
    """The kernel where it runs, the reference elsewhere."""
    if use_kernel(p) and p.is_contiguous() and g.is_contiguous():
        adamw_update_triton(p, g, m, v, lr, beta1, beta2, eps, wd, step, decoupled,
                            grad_scale, stochastic, seed)
    elif stochastic:  # one draw of the rounding noise over the whole tensor
        gen = torch.Generator(p.device).manual_seed(seed)
        adamw_update_reference(p, g, m, v, lr, beta1, beta2, eps, wd, step, decoupled,
                               grad_scale, stochastic, gen)
    else:
        for ps, gs, ms, vs in slices(p, g, m, v):
            adamw_update_reference(ps, gs, ms, vs, lr, beta1, beta2, eps, wd, step,
                                   decoupled, grad_scale)
