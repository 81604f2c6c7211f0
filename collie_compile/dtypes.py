"""The dtypes a model trains in, by name: the one table every stage reads.

Names and sizes need no torch (the planner CLI prices a cached profile without it); the
torch dtype of a name is looked up when asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collie_compile.errors import CollieError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_dtype(name: str) -> str:
    """``name`` in canonical (lower) case, or an error listing the dtypes."""
    if name.lower() not in DTYPE_NAMES:
        raise CollieError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return name.lower()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a dtype name (fp32, bf16, fp16; any case)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        check_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str | None:
    """The name of a torch dtype, None for one we do not train in."""
    return next((n for n in DTYPE_NAMES if torch_dtype(n) == dtype), None)


def fused_gqa_dtypes(device: torch.device) -> tuple[str, ...]:
    """Dtypes in which SDPA on ``device`` has a fused grouped-query attention kernel: every
    one on a CPU; on CUDA flash's, bf16 and fp16 from sm80 on (the memory-efficient
    kernel takes no groups)."""
    import torch

    if device.type != "cuda":
        return DTYPE_NAMES
    return ("bf16", "fp16") if torch.cuda.get_device_capability(device) >= (8, 0) else ()
