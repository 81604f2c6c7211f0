"""Adan update (Xie et al. 2022): Nesterov momentum estimation, decoupled weight decay.

    ĝ = g / grad_scale;  d = ĝ - g_prev (0 at step 1);  g_prev ← ĝ
    m ← β1·m + (1-β1)·ĝ;  v ← β2·v + (1-β2)·d;  n ← β3·n + (1-β3)·(ĝ + β2·d)²
    p ← p·(1 - lr·wd) - lr·(m/(1-β1ᵗ) + β2·v/(1-β2ᵗ)) / (sqrt(n/(1-β3ᵗ)) + eps)

One pass over memory: read p, g, m, v, n, g_prev; write p, m, v, n, g_prev (44 bytes per
fp32 parameter). States fp32; math in fp32 whatever p's dtype; in place. ``adan_update``
runs the kernel on CUDA and the reference elsewhere; tests run the kernel through
Triton's interpreter. 16-bit ``p`` may be rounded stochastically.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import AUTOTUNE_BLOCKS, INTERPRET_BLOCK, interpreting, slices, use_kernel
from .rounding import check_stochastic, round_to, store_rounded


@triton.jit
def _adan_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n_ptr, prev_ptr, numel, lr, wd, beta1, beta2,
                 beta3, eps, bc1, bc2, bc3, inv_scale, seed, FIRST: tl.constexpr,
                 STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    if FIRST:
        d = tl.zeros_like(g)
    else:
        d = g - tl.load(prev_ptr + offs, mask=mask, other=0.0)
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1 - beta2) * d
    u = g + beta2 * d
    n = beta3 * tl.load(n_ptr + offs, mask=mask, other=0.0) + (1 - beta3) * u * u
    step = m / bc1 + beta2 * v / bc2
    p = p * (1 - lr * wd) - lr * step / (tl.sqrt(n / bc3) + eps)
    store_rounded(p_ptr, offs, p, mask, seed, STOCHASTIC)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(n_ptr + offs, n, mask=mask)
    tl.store(prev_ptr + offs, g, mask=mask)


@functools.cache
def _autotuned() -> triton.runtime.Autotuner:
    # restore_value: autotuning runs the kernel per config; every state must change once.
    return triton.autotune([triton.Config({"BLOCK": b}) for b in AUTOTUNE_BLOCKS],
                           key=["numel"],
                           restore_value=["p_ptr", "m_ptr", "v_ptr", "n_ptr", "prev_ptr"]
                           )(_adan_kernel)


def _corrections(betas: tuple[float, float, float], step: int) -> tuple[float, ...]:
    return tuple(1 - b**step for b in betas)


def adan_update_triton(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                       betas: tuple[float, float, float], eps: float, wd: float,
                       grad_scale: float = 1.0, stochastic: bool = False,
                       seed: int = 0) -> None:
    """Launch the kernel: ``state`` holds fp32 m, v, n, prev_grad shaped like ``p`` and
    ``step``, the number of this update (1 on the first)."""
    assert p.is_contiguous() and g.is_contiguous() and p.shape == g.shape
    numel, sr, t = p.numel(), check_stochastic(p, stochastic), state["step"]
    args = (p, g, state["m"], state["v"], state["n"], state["prev_grad"], numel, lr, wd,
            *betas, eps, *_corrections(betas, t), 1.0 / grad_scale, seed, t == 1, sr)
    if interpreting():
        _adan_kernel[(triton.cdiv(numel, INTERPRET_BLOCK),)](*args, BLOCK=INTERPRET_BLOCK)
    else:
        _autotuned()[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](*args)


@torch.no_grad()
def adan_update_reference(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                          betas: tuple[float, float, float], eps: float, wd: float,
                          grad_scale: float = 1.0, stochastic: bool = False,
                          generator: torch.Generator | None = None) -> None:
    """The same update in plain torch."""
    b1, b2, b3 = betas
    c1, c2, c3 = _corrections(betas, state["step"])
    w = p if p.dtype == torch.float32 else p.float()
    g = g.float() if grad_scale == 1.0 else g.float().mul(1.0 / grad_scale)  # as the kernel
    d = torch.zeros_like(g) if state["step"] == 1 else g - state["prev_grad"]
    state["prev_grad"].copy_(g)
    state["m"].mul_(b1).add_(g, alpha=1 - b1)
    state["v"].mul_(b2).add_(d, alpha=1 - b2)
    u = d.mul_(b2).add_(g)  # ĝ + β2·d
    state["n"].mul_(b3).addcmul_(u, u, value=1 - b3)
    denom = (state["n"] / c3).sqrt_().add_(eps)
    step = (state["m"] / c1).add_(state["v"], alpha=b2 / c2)
    w.mul_(1 - lr * wd).addcdiv_(step, denom, value=-lr)
    if w is not p:
        p.copy_(round_to(w, p.dtype, stochastic, generator))


def adan_update(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                betas: tuple[float, float, float], eps: float, wd: float,
                grad_scale: float = 1.0, stochastic: bool = False, seed: int = 0) -> None:
    """The kernel where it runs, the reference elsewhere."""
    if use_kernel(p) and p.is_contiguous() and g.is_contiguous():
        adan_update_triton(p, g, state, lr, betas, eps, wd, grad_scale, stochastic, seed)
    elif stochastic:  # one draw of the rounding noise over the whole tensor
        gen = torch.Generator(p.device).manual_seed(seed)
        adan_update_reference(p, g, state, lr, betas, eps, wd, grad_scale, stochastic, gen)
    else:
        keys = ("m", "v", "n", "prev_grad")
        for ps, gs, *ss in slices(p, g, *(state[k] for k in keys)):
            adan_update_reference(ps, gs, {"step": state["step"], **dict(zip(keys, ss))}, lr,
                                  betas, eps, wd, grad_scale)
