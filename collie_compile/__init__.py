"""collie-compile: plan and run distributed training of Hugging Face causal LMs."""

from .errors import CollieError
from .estimate import Estimate, estimate
from .plan import Plan
from .planner import plan
from .runtime import ParallelModel, parallelize

__version__ = "0.1.0"
__all__ = ["CollieError", "Estimate", "ParallelModel", "Plan", "estimate", "parallelize",
           "plan"]
