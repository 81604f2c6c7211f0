"""Lion update (Chen et al. 2023): sign of an interpolated momentum.

    c = β1·m + (1-β1)·g;  p ← p·(1 - lr·wd) - lr·sign(c);  m ← β2·m + (1-β2)·g

with g divided by ``grad_scale`` first (loss scale and clip factor, when updated inside
backward). One pass over memory: read p, g, m; write p, m (20 bytes per fp32 parameter). Math in
fp32 whatever the weight dtype; in place. ``lion_update`` runs the kernel on CUDA and
the reference elsewhere; tests run the kernel through Triton's interpreter. 16-bit weights
may be rounded stochastically (:mod:`.rounding`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import AUTOTUNE_BLOCKS, INTERPRET_BLOCK, interpreting, slices, use_kernel
from .rounding import check_stochastic, round_to, store_rounded


@triton.jit
def _lion_kernel(p_ptr, g_ptr, m_ptr, n, lr, wd, beta1, beta2, inv_scale, seed,
                 STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    c = beta1 * m + (1 - beta1) * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * (1 - lr * wd) - lr * sign
    store_rounded(p_ptr, offs, p, mask, seed, STOCHASTIC)
    tl.store(m_ptr + offs, beta2 * m + (1 - beta2) * g, mask=mask)


@functools.cache
def _autotuned() -> triton.runtime.Autotuner:
    # restore_value: autotuning runs the kernel once per config; without restoring p and m
    # between runs the update would be applied several times.
    return triton.autotune([triton.Config({"BLOCK": b}) for b in AUTOTUNE_BLOCKS], key=["n"],
                           restore_value=["p_ptr", "m_ptr"])(_lion_kernel)


def lion_update_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float,
                       beta1: float = 0.9, beta2: float = 0.99, wd: float = 0.0,
                       stochastic: bool = False, seed: int = 0, grad_scale: float = 1.0) -> None:
    """Launch the kernel on contiguous ``p`` (any float dtype), ``g`` and fp32 ``m``."""
    assert p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
    assert m.dtype == torch.float32 and p.shape == g.shape == m.shape
    n, sr = p.numel(), check_stochastic(p, stochastic)
    if interpreting():
        grid = (triton.cdiv(n, INTERPRET_BLOCK),)
        _lion_kernel[grid](p, g, m, n, lr, wd, beta1, beta2, 1.0 / grad_scale, seed, sr,
                           BLOCK=INTERPRET_BLOCK)
    else:
        _autotuned()[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            p, g, m, n, lr, wd, beta1, beta2, 1.0 / grad_scale, seed, sr)


@torch.no_grad()
def lion_update_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float,
                          beta1: float = 0.9, beta2: float = 0.99, wd: float = 0.0,
                          stochastic: bool = False,
                          generator: torch.Generator | None = None,
                          grad_scale: float = 1.0) -> None:
    """Update ``p`` and fp32 momentum ``m`` in place from gradient ``g`` (plain torch)."""
    g = g.float() if grad_scale == 1.0 else g.float().mul(1.0 / grad_scale)  # as the kernel
    c = m.mul(beta1).add_(g, alpha=1 - beta1)
    new_p = p.float().mul_(1 - lr * wd).add_(c.sign_(), alpha=-lr)
    p.copy_(round_to(new_p, p.dtype, stochastic, generator))
    m.mul_(beta2).add_(g, alpha=1 - beta2)


def lion_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float,
                beta1: float = 0.9, beta2: float = 0.99, wd: float = 0.0,
                stochastic: bool = False, seed: int = 0, grad_scale: float = 1.0) -> None:
    """The kernel where it runs, the reference elsewhere."""
    if use_kernel(p) and p.is_contiguous() and g.is_contiguous():
        lion_update_triton(p, g, m, lr, beta1, beta2, wd, stochastic, seed, grad_scale)
    elif stochastic:  # one draw of the rounding noise over the whole tensor
        gen = torch.Generator(p.device).manual_seed(seed)
        lion_update_reference(p, g, m, lr, beta1, beta2, wd, stochastic, gen, grad_scale)
    else:
        for ps, gs, ms in slices(p, g, m):
            lion_update_reference(ps, gs, ms, lr, beta1, beta2, wd, grad_scale=grad_scale)
