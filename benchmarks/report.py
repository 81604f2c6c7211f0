"""What every suite shares: the machine line, markdown tables, and writing them (with
PNG plots) into the output directory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


def machine() -> str:
    """One line naming where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:  # the model name, where Linux tells it
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = (f", GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
           else ", no GPU")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}{gpu}")


ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """A worker launch failed; the message is the end of its stderr."""


def launch(script: str, nproc: int, args: list[str], env: dict[str, str] | None = None
           ) -> object:
    """Run ``benchmarks/<script>`` on ``nproc`` local ranks (one thread each, plus
    ``env``) under torchrun with ``--out FILE`` appended; what rank 0 wrote there, as
    JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ROOT / "benchmarks" / script), *args,
               "--out", str(result)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        if proc.returncode != 0:
            raise LaunchError(proc.stderr[-3000:])
        return json.loads(result.read_text())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = ()) -> str:
    """A markdown table; columns in ``right`` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects a suite's text; ``save`` writes ``<suite>.md`` into ``out`` (if given)."""

    def __init__(self, suite: str, out: str | Path | None) -> None:
        self.suite, self.out = suite, Path(out) if out else None
        self.parts = [f"# {suite}\n", f"Machine: {machine()}\n"]
        print(self.parts[1], flush=True)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.parts.append(text + "\n")

    def plot(self, name: str, draw: object) -> None:
        """``draw(ax)`` fills one matplotlib axes; saved as ``<name>.png``."""
        if not self.out:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=110)
        plt.close(fig)
        self.parts.append(f"![{name}]({name}.png)\n")

    def save(self) -> Path | None:
        if not self.out:
            return None
        path = self.out / f"{self.suite}.md"
        path.write_text("\n".join(self.parts))
        print(f"written: {path}")
        return path
