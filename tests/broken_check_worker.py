"""The check worker with the tensor-parallel gradient sum of replicated weights switched
off: test_conformance.py runs it to show that a broken pass fails the check, naming the
tensor."""

from collie_compile.runtime import check as check
from collie_compile.runtime.step import Stepper

Stepper._sum_partial_grads = lambda self: None

if __name__ == "__main__":
    check.main()
