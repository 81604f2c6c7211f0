"""collie-compile: plan and run distributed training of Hugging Face causal LMs.

The public API is imported on first use, so that the planner CLI (``estimate``,
``plan``) starts without the runtime, capture or transformers' modeling code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "CollieError": "collie_compile.errors",
    "Estimate": "collie_compile.cost.estimate",
    "estimate": "collie_compile.cost.estimate",
    "Plan": "collie_compile.planner.result",
    "plan": "collie_compile.planner.search",
    "ParallelModel": "collie_compile.runtime.parallel_model",
    "parallelize": "collie_compile.runtime.parallel_model",
    "Trainer": "collie_compile.training.trainer",
    "LRSchedule": "collie_compile.optim.schedules",
}
__all__ = ["CollieError", "Estimate", "LRSchedule", "ParallelModel", "Plan", "Trainer",
           "estimate", "parallelize", "plan"]

if TYPE_CHECKING:
    from collie_compile.cost.estimate import Estimate, estimate
    from collie_compile.errors import CollieError
    from collie_compile.optim.schedules import LRSchedule
    from collie_compile.planner.result import Plan
    from collie_compile.planner.search import plan
    from collie_compile.runtime.parallel_model import ParallelModel, parallelize
    from collie_compile.training.trainer import Trainer


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'collie_compile' has no attribute {name!r}")
