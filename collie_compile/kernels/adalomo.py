"""AdaLomo update (Lv et al. 2023): LOMO with a factored second moment.

For a matrix gradient G (m x n), ĝ = G / grad_scale, β = 1 - t^-0.8 at step t:
    r ← β·r + (1-β)·rowmean(ĝ² + ε₁);   c ← β·c + (1-β)·colmean(ĝ² + ε₁)
    U = ĝ · sqrt(mean(r) / r) · 1/sqrt(cᵀ);   U ← U / max(1, RMS(U))
    p ← p·(1 - η·wd) - η·U,              η = lr·max(ε₂, RMS(p))
Vectors keep a full second moment v instead of r and c. ε₁ = 1e-30, ε₂ = 1e-3.

Sharded parameters: a tensor- or data-parallel rank holds a slice of p. Row and column
means, mean(r), RMS(U) and RMS(p) are then sums over the ranks holding the other
slices; ``allsum(t, dims)`` adds ``t`` in place over the ranks that split the given
dims (with element counts summed beside the statistics, so no rank needs the full shape).
With it the sharded update equals the unsharded one.

Three passes over G (statistics with Σp², then ΣU², then the update) with the reductions
between them. On CUDA they are Triton kernels on [BLOCK_M, BLOCK_N] tiles writing
per-tile partial sums (no atomics: deterministic); elsewhere plain torch does the same.
Vectors (norm weights, biases) always take the torch path: they are small. The scalars
between the passes (mean(r), η, 1/max(1, RMS(U))) stay on the device as 0-dim tensors
that the kernels read through a pointer: no host synchronisation inside an update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._launch import REFERENCE_SLICE, interpreting, use_kernel
from .rounding import check_stochastic, round_to, store_rounded

EPS1 = 1e-30
EPS2 = 1e-3

Allsum = Callable[[torch.Tensor, tuple[int, ...]], None]


def _local(t: torch.Tensor, dims: tuple[int, ...]) -> None:
    """An unsharded parameter: its statistics are already whole."""


def adalomo_state(p: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Fresh fp32 state for ``p`` (this rank's slice): row and column statistics, or a
    full moment."""
    if p.dim() == 2:
        return {"step": 0, "row": torch.zeros(p.shape[0], device=p.device),
                "col": torch.zeros(p.shape[1], device=p.device)}
    return {"step": 0, "v": torch.zeros(p.shape, device=p.device)}


# -- the three passes in plain torch --------------------------------------------------

def _row_blocks(g: torch.Tensor) -> list[slice]:
    # rows at a time, so the passes' fp32 temporaries are a block, not the whole matrix
    # (REFERENCE_SLICE elements; on top of a backward's activations when inside it)
    step = max(1, REFERENCE_SLICE // max(1, g.shape[1]))
    return [slice(i, i + step) for i in range(0, g.shape[0], step)] or [slice(None)]


def _torch_stats(p, g, inv):
    rows, cols, psq = [], 0, 0
    for b in _row_blocks(g):
        sq = (g[b].float() * inv).square_()
        rows.append(sq.sum(1))
        cols, psq = sq.sum(0) + cols, p[b].float().square().sum() + psq
    return torch.cat(rows), cols, psq


def _factor(row, col, rmean):
    # sqrt(mean(r) / r) · 1/sqrt(c) as two factors, as Adafactor computes it: r·cᵀ
    # itself underflows to 0 in fp32 where a gradient is all zero (r = c = ε₁ = 1e-30,
    # LoRA's A at the first step), and 0/0 would make the update NaN
    return torch.outer((rmean / row).sqrt(), col.rsqrt())


def _torch_usq(g, row, col, scal, inv):
    return sum((g[b].float() * inv).square_().mul_(_factor(row[b], col, scal[0]).square_()).sum()
               for b in _row_blocks(g))


def _torch_apply(p, g, row, col, scal, inv, wd, stochastic, seed):
    rmean, eta, unorm = scal
    gen = torch.Generator(p.device).manual_seed(seed) if stochastic else None
    blocks = [slice(None)] if stochastic else _row_blocks(g)  # one draw of rounding noise
    for b in blocks:
        u = (g[b].float() * inv).mul_(_factor(row[b], col, rmean))
        new = p[b].float().mul_(1 - eta * wd).sub_(u.mul_(eta * unorm))
        p[b].copy_(round_to(new, p.dtype, stochastic, gen))


# -- the three passes as Triton kernels ------------------------------------------------

@triton.jit
def _tile(m, n, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    cn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < m) & (cn[None, :] < n)
    return rm, cn, rm[:, None] * n + cn[None, :], mask


@triton.jit
def _stats_kernel(p_ptr, g_ptr, rows_ptr, cols_ptr, psq_ptr, m, n, inv,
                  BM: tl.constexpr, BN: tl.constexpr):
    # rows: [tiles along n, m] partial row sums; cols: [tiles along m, n]; psq: per tile
    rm, cn, offs, mask = _tile(m, n, BM, BN)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sq = g * g
    i, j = tl.program_id(0), tl.program_id(1)
    tl.store(rows_ptr + j * m + rm, tl.sum(sq, 1), mask=rm < m)
    tl.store(cols_ptr + i * n + cn, tl.sum(sq, 0), mask=cn < n)
    tl.store(psq_ptr + i * tl.num_programs(1) + j, tl.sum(tl.sum(p * p, 1), 0))


@triton.jit
def _usq_kernel(g_ptr, row_ptr, col_ptr, out_ptr, scal_ptr, m, n, inv,
                BM: tl.constexpr, BN: tl.constexpr):
    rm, cn, offs, mask = _tile(m, n, BM, BN)
    rmean = tl.load(scal_ptr)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv
    r = tl.load(row_ptr + rm, mask=rm < m, other=1.0)
    c = tl.load(col_ptr + cn, mask=cn < n, other=1.0)
    f = tl.sqrt(rmean / r)[:, None] * (1.0 / tl.sqrt(c))[None, :]  # see _factor
    u2 = g * g * f * f
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(u2, 1), 0))


@triton.jit
def _apply_kernel(p_ptr, g_ptr, row_ptr, col_ptr, scal_ptr, m, n, inv, wd, seed,
                  STOCHASTIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rm, cn, offs, mask = _tile(m, n, BM, BN)
    rmean, eta, unorm = tl.load(scal_ptr), tl.load(scal_ptr + 1), tl.load(scal_ptr + 2)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(row_ptr + rm, mask=rm < m, other=1.0)
    c = tl.load(col_ptr + cn, mask=cn < n, other=1.0)
    u = g * (tl.sqrt(rmean / r)[:, None] * (1.0 / tl.sqrt(c))[None, :])  # see _factor
    store_rounded(p_ptr, offs, p * (1 - eta * wd) - eta * unorm * u, mask, seed, STOCHASTIC)


def _blocks() -> tuple[int, int]:
    return (16, 32) if interpreting() else (32, 128)  # small under the interpreter: edges


def _grid(m: int, n: int) -> tuple[int, int]:
    bm, bn = _blocks()
    return triton.cdiv(m, bm), triton.cdiv(n, bn)


def _triton_stats(p, g, inv):
    m, n = g.shape
    gm, gn = _grid(m, n)
    rows = torch.empty(gn, m, device=g.device)
    cols = torch.empty(gm, n, device=g.device)
    psq = torch.empty(gm * gn, device=g.device)
    bm, bn = _blocks()
    _stats_kernel[(gm, gn)](p, g, rows, cols, psq, m, n, inv, BM=bm, BN=bn)
    return rows.sum(0), cols.sum(0), psq.sum()


def _triton_usq(g, row, col, scal, inv):
    m, n = g.shape
    gm, gn = _grid(m, n)
    out = torch.empty(gm * gn, device=g.device)
    bm, bn = _blocks()
    _usq_kernel[(gm, gn)](g, row, col, out, scal, m, n, inv, BM=bm, BN=bn)
    return out.sum()


@functools.cache
def _autotuned_apply() -> triton.runtime.Autotuner:
    # restore_value: autotuning runs the kernel per config; p must be updated only once.
    configs = [triton.Config({"BM": bm, "BN": bn}) for bm, bn in ((32, 128), (64, 64),
                                                                  (16, 256))]
    return triton.autotune(configs, key=["m", "n"], restore_value=["p_ptr"])(_apply_kernel)


def _triton_apply(p, g, row, col, scal, inv, wd, stochastic, seed):
    m, n = g.shape
    args = (p, g, row, col, scal, m, n, inv, wd, seed, stochastic)
    if interpreting():
        bm, bn = _blocks()
        _apply_kernel[_grid(m, n)](*args, BM=bm, BN=bn)
    else:
        _autotuned_apply()[lambda meta: (triton.cdiv(m, meta["BM"]),
                                         triton.cdiv(n, meta["BN"]))](*args)


# -- the update -------------------------------------------------------------------------

@torch.no_grad()
def _update(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float, wd: float,
            grad_scale: float, allsum: Allsum | None, stochastic: bool, seed: int,
            kernels: bool) -> None:
    allsum = allsum or _local
    state["step"] += 1
    beta = 1.0 - state["step"] ** -0.8
    inv, sr = 1.0 / grad_scale, check_stochastic(p, stochastic)
    kernels = kernels and p.numel() > 0  # an empty FSDP shard: nothing to launch
    if p.dim() != 2:  # full second moment
        gs = g.float() * inv
        v = state["v"].mul_(beta).add_(gs.square().add_(EPS1), alpha=1 - beta)
        u = gs.div_(v.sqrt())
        sums = torch.stack([u.square().sum(), p.float().square().sum(),
                            torch.tensor(float(p.numel()), device=p.device)])
        allsum(sums, tuple(range(p.dim())))
        eta, unorm = _eta_unorm(lr, sums)
        new = p.float().mul_(1 - eta * wd).sub_(u.mul_(eta * unorm))
        gen = torch.Generator(p.device).manual_seed(seed) if sr else None
        p.copy_(round_to(new, p.dtype, sr, gen))
        return
    stats, usq, apply = ((_triton_stats, _triton_usq, _triton_apply) if kernels
                         else (_torch_stats, _torch_usq, _torch_apply))
    m, n = p.shape
    rows, cols, psq = stats(p, g, inv)
    a = torch.cat([rows, rows.new_tensor([n])])  # row sums, split over ranks along dim 1
    allsum(a, (1,))
    row = state["row"].mul_(beta).add_(a[:m] / a[m] + EPS1, alpha=1 - beta)
    b = torch.cat([cols, torch.stack([row.sum(), cols.new_tensor(m)])])
    allsum(b, (0,))
    col = state["col"].mul_(beta).add_(b[:n] / b[n + 1] + EPS1, alpha=1 - beta)
    rmean = (b[n] / b[n + 1]).reshape(1)
    c = torch.stack([usq(g, row, col, rmean, inv), psq, psq.new_tensor(m * n)])
    allsum(c, (0, 1))
    apply(p, g, row, col, torch.cat([rmean, *_eta_unorm(lr, c)]), inv, wd, sr, seed)


def _eta_unorm(lr: float, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """η = lr·max(ε₂, RMS(p)) and 1/max(1, RMS(U)) from [ΣU², Σp², count], on the device."""
    unorm = (sums[0] / sums[2]).sqrt().clamp_(min=1.0).reciprocal().reshape(1)
    eta = (sums[1] / sums[2]).sqrt().clamp_(min=EPS2).mul_(lr).reshape(1)
    return eta, unorm


def adalomo_update_reference(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                             wd: float = 0.0, grad_scale: float = 1.0,
                             allsum: Allsum | None = None, stochastic: bool = False,
                             seed: int = 0) -> None:
    """Update ``p`` (this rank's slice) and ``state`` in place from gradient ``g``, in
    plain torch."""
    _update(p, g, state, lr, wd, grad_scale, allsum, stochastic, seed, kernels=False)


def adalomo_update_triton(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float,
                          wd: float = 0.0, grad_scale: float = 1.0,
                          allsum: Allsum | None = None, stochastic: bool = False,
                          seed: int = 0) -> None:
    """The same update with the three passes over G as Triton kernels (contiguous p, g)."""
    assert p.is_contiguous() and g.is_contiguous() and p.shape == g.shape
    _update(p, g, state, lr, wd, grad_scale, allsum, stochastic, seed, kernels=True)


def adalomo_update(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float, wd: float = 0.0,
                   grad_scale: float = 1.0, allsum: Allsum | None = None,
                   stochastic: bool = False, seed: int = 0) -> None:
    """The kernels where they run, the reference elsewhere."""
    kernels = use_kernel(p) and p.is_contiguous() and g.is_contiguous()
    _update(p, g, state, lr, wd, grad_scale, allsum, stochastic, seed, kernels)
