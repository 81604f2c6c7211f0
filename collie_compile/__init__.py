"""collie-compile: plan and run distributed training of Hugging Face causal LMs."""

from collie_compile.cost.estimate import Estimate, estimate
from collie_compile.errors import CollieError
from collie_compile.planner.result import Plan
from collie_compile.planner.search import plan
from collie_compile.runtime.parallel_model import ParallelModel, parallelize

__version__ = "0.1.0"
__all__ = ["CollieError", "Estimate", "ParallelModel", "Plan", "estimate", "parallelize",
           "plan"]
