"""User-facing errors.

Anything a user can cause (a bad model name, sizes that do not divide, a plan that cannot
fit) raises a subclass of :class:`CollieError` whose message is one line naming the
problem and what to do about it. The CLI prints that line and exits with ``exit_code``.
"""

from __future__ import annotations


def flag(param: str) -> str:
    """The command-line flag of a parameter: ``micro_batch_size`` -> ``--micro-batch``."""
    return "--" + param.removesuffix("_size").replace("_", "-")


def named(param: str) -> str:
    """A parameter as errors name it, for API and CLI users alike: ``seq_len (--seq-len)``."""
    return f"{param} ({flag(param)})"


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: long library messages in one line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class CollieError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it.
    ``shared``: every rank of a distributed run raises this same error (rank 0 reports it)."""

    exit_code = 2

    def __init__(self, *args: object, shared: bool = False) -> None:
        super().__init__(*args)
        self.shared = shared


class CaptureError(CollieError):
    """torch.export could not capture the model."""

