"""User-facing errors.

Anything a user can cause (a bad model name, sizes that do not divide, a plan that cannot
fit) raises a subclass of :class:`CollieError` whose message is one line naming the
problem and what to do about it. The CLI prints that line and exits with ``exit_code``.
"""

from __future__ import annotations


def flag(param: str) -> str:
    """The command-line flag of a parameter: ``micro_batch_size`` -> ``--micro-batch``."""
    return "--" + param.removesuffix("_size").replace("_", "-")


class CollieError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2


class CaptureError(CollieError):
    """torch.export could not capture the model."""


class InfeasibleError(CollieError):
    """No plan fits in the GPUs' memory."""

    exit_code = 3
