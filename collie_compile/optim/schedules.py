"""Learning-rate schedules as data: the rate of every update is a function of its index.

Update i (0-based) of ``steps`` runs at

- warm-up, i < w: ``lr * (i + 1) / (w + 1)`` (never 0: every update moves the weights);
- then, with t = i - w over the n = steps - w updates left:

  - ``constant``: ``lr``;
  - ``linear``: ``lr + (min_lr - lr) * t / n``;
  - ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t / n)) / 2``;
  - ``wsd`` (warm-up, stable, decay): ``lr`` until the last d = ``decay_steps`` updates,
    which fall linearly to ``min_lr``, reached by the last: ``lr + (min_lr - lr) * (t' + 1)
    / d`` for the t'-th of them.

These are torch's ``LinearLR``, ``CosineAnnealingLR`` and ``ConstantLR`` chained by
``SequentialLR`` (the tests compare them), written in closed form so that a resumed run
computes the same rate from the step alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from collie_compile.errors import CollieError

SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each of ``steps`` updates (see the module's formulas)."""

    lr: float
    steps: int
    kind: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None  # wsd only; None: the last 10% of the steps
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise CollieError(f"unknown learning-rate schedule {self.kind!r}; use one of "
                              f"{', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise CollieError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise CollieError(f"--min-lr must be between 0 and --lr ({self.lr}), got "
                              f"{self.min_lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise CollieError(f"--warmup-steps must be at least 0 and fewer than the "
                              f"{self.steps} steps, got {self.warmup_steps}")
        if self.decay_steps is not None and self.kind != "wsd":
            raise CollieError(f"--decay-steps belongs to the wsd schedule, not {self.kind!r}")
        if self.kind == "wsd" and not 0 < self.decay() <= self.steps - self.warmup_steps:
            raise CollieError(f"--decay-steps must be between 1 and the "
                              f"{self.steps - self.warmup_steps} steps after warm-up, got "
                              f"{self.decay()}")

    def decay(self) -> int:
        """wsd: how many final updates decay."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round(0.1 * self.steps))

    def at(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based); past the end, the last one's."""
        i = min(max(step, 0), self.steps - 1)
        w = self.warmup_steps
        if i < w:
            return self.lr * (i + 1) / (w + 1)
        t, n = i - w, self.steps - w
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t / n)) / 2
        if self.kind == "wsd":  # the last update runs at min_lr
            t = i - (self.steps - self.decay())
            if t < 0:
                return self.lr
            return self.lr + (self.min_lr - self.lr) * (t + 1) / self.decay()
        return self.lr + (self.min_lr - self.lr) * t / n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LRSchedule:
        return cls(**d)
