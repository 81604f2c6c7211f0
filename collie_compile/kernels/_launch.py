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
