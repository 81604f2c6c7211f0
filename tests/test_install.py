"""The repository root is on ``sys.path`` whenever someone runs ``python -m ...`` from a
clone (pytest, ``torchrun -m collie_compile``, ``python -m benchmarks``): no name there
may hide an installed distribution's. transformers 5.25 imports Hugging Face's
``kernels`` package, which a top-level ``kernels/`` folder of ours used to shadow.
(A 2-rank ``torchrun -m collie_compile train`` from the root runs in test_runtime.py.)"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _importable_at_root() -> set[str]:
    """Top-level module names the root provides: folders (packages, or namespace packages
    without ``__init__.py``) and ``.py`` files."""
    names = set()
    for path in ROOT.iterdir():
        name = path.stem if path.suffix == ".py" else path.name if path.is_dir() else ""
        if name.isidentifier():
            names.add(name)
    return names


def test_no_name_at_the_root_is_an_installed_distributions() -> None:
    claimed = importlib.metadata.packages_distributions()
    names = _importable_at_root()
    assert {"collie_compile", "benchmarks", "tests"} <= names
    clashes = {n: claimed[n] for n in names - {"collie_compile"} if n in claimed}
    assert not clashes, f"the repository root shadows installed packages: {clashes}"


def test_imports_from_the_root_find_the_installed_packages() -> None:
    """Started in the root, as a user in a clone: ``kernels`` (when installed) is Hugging
    Face's, ``passes`` is nothing, transformers loads a model class, and the CLI runs."""
    code = ("import importlib.util, kernels, transformers\n"
            "from transformers import AutoModelForCausalLM\n"
            "print(kernels.__file__ or 'namespace')\n"
            "print(importlib.util.find_spec('passes'))\n")
    has_kernels = "kernels" in importlib.metadata.packages_distributions()
    if not has_kernels:
        code = code.replace(", kernels,", ",").replace("kernels.__file__ or 'namespace'",
                                                        "importlib.util.find_spec('kernels')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.splitlines()
    if has_kernels:
        assert Path(first).is_relative_to(Path(importlib.metadata.distribution(
            "kernels").locate_file(""))), first
    else:
        assert first == "None", first
    assert second == "None", second
    cli = subprocess.run([sys.executable, "-m", "collie_compile", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "estimate" in cli.stdout, cli.stderr[-2000:]
