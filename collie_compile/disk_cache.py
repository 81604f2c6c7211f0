"""Small JSON results kept on disk between runs (profiles, tp verdicts), keyed by what
decides them. A damaged or absent entry is worked out again; a write is atomic, so a
reader never sees half a file; a read-only home is no reason to fail."""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where collie-compile keeps things between runs ($COLLIE_COMPILE_CACHE, or ~/.cache)."""
    root = os.environ.get("COLLIE_COMPILE_CACHE") or Path.home() / ".cache" / "collie-compile"
    return Path(root)


def cache_dir() -> Path:
    """Where results are kept between runs."""
    return cache_root() / "profiles"


def versions() -> list[str]:
    """The libraries a cached result depends on, read without importing them."""
    from collie_compile import __version__

    return [version("torch"), version("transformers"), __version__]


def code_of(*modules: str) -> list[str]:
    """The source of ``modules`` (dotted names), read without importing them: a cached
    result keyed by it is worked out again whenever the code that decides it changes."""
    return [Path(find_spec(m).origin).read_text() for m in modules]


def entry(kind: str, parts: list[str]) -> Path:
    """The file that holds the result of ``kind`` for ``parts`` (and the library versions)."""
    key = hashlib.sha256("\0".join([*parts, *versions()]).encode()).hexdigest()[:32]
    return cache_dir() / f"{kind}-{key}.json"


def read(path: Path) -> Any:
    """The JSON at ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass
