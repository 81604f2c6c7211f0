"""Where a run's numbers go: ``metrics.jsonl`` in the output folder (one JSON object per
training step, and one per evaluation), TensorBoard scalars beside it when TensorBoard
is installed, and a line on the console. Only rank 0 writes; a resumed run first drops
the records of steps after its checkpoint, so every step is in the file once.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch

from collie_compile.errors import CollieError

METRICS_FILE = "metrics.jsonl"


def has_records(output: Path) -> bool:
    """Whether ``output`` holds the metrics of a run that logged something."""
    path = Path(output) / METRICS_FILE
    return path.is_file() and path.stat().st_size > 0
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package: pip install "
                       "'collie-compile[tensorboard]', or leave the flag out")


def tensorboard_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None


def peak_memory_gib() -> float:
    """This process's peak: CUDA memory allocated, or on a CPU the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


class MetricsLog:
    """Appends records to ``output/metrics.jsonl`` and TensorBoard (``tensorboard``:
    True requires it, None uses it when installed); a no-op where ``enabled`` is False
    (ranks other than 0) or there is no output folder."""

    def __init__(self, output: Path | None, enabled: bool, resume_step: int = 0,
                 tensorboard: bool | None = None) -> None:
        self.path = Path(output) / METRICS_FILE if output is not None and enabled else None
        self.writer = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_after(resume_step)
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise CollieError(TENSORBOARD_MISSING) from None
                return
            # purge_step: a resumed run's events replace the killed run's later ones
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def _drop_after(self, step: int) -> None:
        """Keep only records of steps up to ``step`` (all of them when starting anew)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line the killed run left half-written
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in kept) if step else "")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
