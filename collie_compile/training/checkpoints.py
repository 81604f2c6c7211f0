"""A training run's folder: periodic checkpoints, the newest complete one, pruning.

::

    OUTPUT/
      metrics.jsonl                 one JSON object per step and per evaluation
      tensorboard/                  the same, for TensorBoard (when it is installed)
      checkpoints/step-00000020/    a sharded training checkpoint (index.json,
                                    rank*.safetensors) and trainer_state.json
      final/                        the trained model: a Hugging Face folder or PEFT adapter

A checkpoint is written to ``step-N.tmp`` and renamed when every rank's file and the
index are in it, so a folder named ``step-N`` is complete; what a killed job left
(``.tmp``, ``.old``, marked as ours) is never read and is cleared by the next run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from collie_compile.errors import CollieError
from collie_compile.runtime import folders

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"step-(\d+)")
_LEFT = re.compile(r"step-\d+\.(tmp|old)")  # what a stopped save leaves


@dataclass
class TrainerState:
    """What a checkpoint adds to the weights and optimizer states for an exact resume."""

    step: int  # updates done
    position: int  # training sequences consumed, over epochs
    schedule: dict | None = None  # the LRSchedule the run was started with
    seed: int = 0
    data: dict = field(default_factory=dict)  # sequences, seq_len: to see a changed dataset
    rng: list[str] = field(default_factory=list)  # each rank's torch RNG state, hex

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> TrainerState:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise CollieError(f"{where} is damaged ({e}); delete that checkpoint folder to "
                              "resume from the one before") from None


LOCK_FILE = ".collie-compile.lock"


def lock_output(output: Path) -> object:
    """Hold ``output``'s lock for this process's life (the OS drops it however the process
    ends): the file object to keep. Raise if another job holds it, naming it. (An flock:
    local file systems, and NFS where the server grants them.)"""
    import fcntl
    import socket

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    f = open(output / LOCK_FILE, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise CollieError(f"--output {output} is in use by another job ({holder}); wait for "
                          "it to end or stop it, or give another --output") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def checkpoints_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def checkpoint_path(output: Path, step: int) -> Path:
    return checkpoints_dir(output) / f"step-{step:08d}"


def complete_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``output``, oldest first."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir() and (d / "index.json").is_file() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def read_state(folder: Path) -> TrainerState:
    return TrainerState.from_json((folder / STATE_FILE).read_text(), folder / STATE_FILE)


def clear_partial(output: Path) -> list[Path]:
    """Remove what a killed save of ours left (``step-N.tmp``, ``step-N.old``, marked by
    its manifest: :mod:`collie_compile.runtime.folders`); returns them. Any other folder
    (``step-best`` a user keeps, a copy) stays."""
    root = checkpoints_dir(output)
    left = [d for d in root.glob("step-*") if _LEFT.fullmatch(d.name) and d.is_dir()]
    return [d for d in left if folders.remove_ours(d)]


def prune(output: Path, keep_last: int | None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (None: all)."""
    if keep_last is None:
        return
    for _, d in complete_checkpoints(output)[:-keep_last]:
        if folders.read_manifest(d) is None:
            continue  # not one of ours (or saved before manifests): left alone
        old = d.with_name(d.name + ".old")  # renamed first: never half a "step-N"
        d.rename(old)
        folders.remove_ours(old)
