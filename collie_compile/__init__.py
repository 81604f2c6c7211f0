"""collie-compile: plan and run distributed training of Hugging Face causal LMs."""

from .errors import CollieError
from .estimate import Estimate, estimate
from .plan import Plan
from .planner import plan

__version__ = "0.1.0"
__all__ = ["CollieError", "Estimate", "Plan", "estimate", "plan"]
