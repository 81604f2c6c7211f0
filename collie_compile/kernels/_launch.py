"""Shared launch plumbing for the update kernels: one place decides kernel vs reference."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_kernel(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors (or anywhere under the interpreter, for tests)."""
    return t.is_cuda or interpreting()


AUTOTUNE_BLOCKS = (1024, 2048, 4096)
INTERPRET_BLOCK = 128  # small, so tests cross block edges with small tensors

# Elements per slice when a reference update runs on the CPU: its temporaries (sqrt(v),
# sign(c), an fp32 copy of a 16-bit weight) are then a slice, not a whole parameter. A
# kernel has none; a whole-parameter temporary, inside backward, comes on top of the
# activations still held (2 x 12 MiB for AdamW's largest weight in benchmarks/rss.py).
REFERENCE_SLICE = 1 << 16


def slices(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching flat slices of same-sized contiguous tensors, for an elementwise update
    to run slice by slice (the same result); the whole tensors where one is strided."""
    if not all(t.is_contiguous() for t in tensors) or tensors[0].numel() <= REFERENCE_SLICE:
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(f[i:i + REFERENCE_SLICE] for f in flat)
            for i in range(0, flat[0].numel(), REFERENCE_SLICE)]
