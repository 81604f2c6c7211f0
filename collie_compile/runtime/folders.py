"""The folders our saves write: which folder a save may take, how it is put in place, and
how a load knows it is whole.

A save writes ``D.tmp`` and renames it to ``D`` (a previous ``D`` is renamed ``D.old``
meanwhile, then removed), so a folder named ``D`` is never half written. Each folder a
save writes holds :data:`MANIFEST`: the kind of save and the SHA-256 of every file in it.
It is written first (the kind alone: "being written") and last (with the digests), and it
is what makes a folder ours:

- a save goes to a new or empty folder, or replaces a save of its own kind that we wrote
  and that holds nothing beyond what its manifest lists; never a user's folder, and it
  deletes no file but those a manifest of ours lists;
- a load checks every file against its digest, so a damaged or truncated file is refused
  by name instead of training on what it reads.

The Hugging Face files (``config.json``, ``model.safetensors``, ``adapter_*``) stay as
transformers and peft write them: the manifest is one more file, which both ignore.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from collie_compile.errors import CollieError

MANIFEST = "collie_compile_save.json"
KINDS = ("pretrained", "adapter", "checkpoint")
_CHUNK = 1 << 24


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 16 MiB chunks (about 1.7 GB/s on one core here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a folder one of our saves wrote, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        ok = (isinstance(m, dict) and m.get("kind") in KINDS
              and isinstance(m.get("files"), dict) and isinstance(m.get("complete"), bool))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise CollieError(f"{path} is damaged; the save in {folder} cannot be trusted: "
                          "save again, or load an earlier one")
    return m


def _write_manifest(folder: Path, kind: str, files: dict[str, str], complete: bool) -> None:
    text = json.dumps({"kind": kind, "complete": complete, "files": files}, indent=1)
    part = folder / (MANIFEST + ".part")
    part.write_text(text)
    part.replace(folder / MANIFEST)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _ours(path: Path, final: Path, kind: str | None) -> dict | None:
    """The manifest of ``path`` if a save may remove it (None: absent or empty); raise if
    ``path`` is a file, a user's folder, a save of another kind (``kind`` given), or a save
    with files added to it."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir() or path.is_symlink():
        raise CollieError(f"cannot save to {final}: {path} exists and is not a folder; "
                          "give a new folder name")
    names = sorted(f.name for f in path.iterdir())
    if not names:
        return None
    m = read_manifest(path)
    if m is None:
        raise CollieError(f"cannot save to {final}: {path} holds files no collie-compile "
                          f"save wrote ({_listing(names)}), which saving there would "
                          "replace; give a new or empty folder")
    if kind is not None and m["kind"] != kind:
        raise CollieError(f"cannot save to {final}: it holds a collie-compile {m['kind']} "
                          f"save, and this is a {kind} save; give another folder")
    extra = [n for n in names if n not in m["files"] and n != MANIFEST]
    if m["complete"] and extra:
        raise CollieError(f"cannot save to {final}: {path} holds files the save there did "
                          f"not write ({_listing(extra)}); move them, or give another folder")
    return m


def check_target(final: str | Path, kind: str) -> None:
    """Raise unless a ``kind`` save may write ``final``: it is new or empty, or a complete
    save of the same kind of ours; and its ``.tmp``/``.old`` siblings are absent, empty or
    what a killed save of ours left."""
    final = Path(final)
    _ours(final, final, kind)
    for side in (staging(final), _old(final)):
        _ours(side, final, None)
    # found now, not after the training: a folder where none can be made
    parent = next(p for p in (final.parent.absolute(), *final.parent.absolute().parents)
                  if p.exists())
    if not parent.is_dir():
        raise CollieError(f"cannot save to {final}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CollieError(f"cannot save to {final}: {parent} is not writable")


def staging(final: str | Path) -> Path:
    """The folder a save of ``final`` is written in before it is renamed into place."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def _old(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def remove_ours(path: Path) -> bool:
    """Delete a folder one of our saves wrote: the files its manifest lists (all of them
    while it was still being written), the manifest, the folder. A file of anyone else's
    stays, and so does the folder then. Returns whether the folder is gone."""
    m = read_manifest(path) if path.is_dir() else None
    if m is None:
        return False
    for f in path.iterdir():
        if f.name in m["files"] or f.name == MANIFEST or not m["complete"]:
            if f.is_file() or f.is_symlink():
                f.unlink()
    try:
        path.rmdir()
    except OSError:  # something not ours is left in it
        return False
    return True


def begin(final: str | Path, kind: str) -> Path:
    """The empty ``final.tmp`` a ``kind`` save writes into (rank 0; after
    :func:`check_target`), marked as ours before any file goes in."""
    tmp = staging(Path(final))
    if tmp.exists():
        remove_ours(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    _write_manifest(tmp, kind, {}, complete=False)
    return tmp


def finish(tmp: Path, final: str | Path, kind: str,
           digests: dict[str, str] | None = None) -> None:
    """Record every file's digest (``digests``: those other ranks computed of their own
    files) and rename ``tmp`` to ``final``, replacing the save there."""
    final = Path(final)
    digests = digests or {}
    files = {f.name: digests.get(f.name) or sha256(f) for f in sorted(tmp.iterdir())
             if f.name != MANIFEST}
    _write_manifest(tmp, kind, files, complete=True)
    old = _old(final)
    if final.exists():
        if old.exists():
            remove_ours(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        remove_ours(old)


def missing(folder: str | Path) -> str:
    """Why a save folder that should be there is not, or "" when it is."""
    folder = Path(folder)
    if folder.exists():
        return ""
    if (_old(folder) / MANIFEST).is_file():
        return (f"{folder} does not exist, but {_old(folder)} holds the save before it: a "
                f"save was stopped between its two renames. Rename {_old(folder)} to "
                f"{folder.name} to use it" + (
                    f" (or {staging(folder)}, the newer one, if complete)"
                    if (staging(folder) / MANIFEST).is_file() else ""))
    return f"{folder} does not exist"


def verify(folder: str | Path, rank: int = 0, world: int = 1) -> bool:
    """Check the files of a save against its manifest: every listed file present, and this
    rank's share of them (every ``world``-th, from ``rank``) hashing to its digest. Returns
    False for a folder saved before manifests were written (nothing to check it with)."""
    folder = Path(folder)
    if not folder.exists():
        raise CollieError(missing(folder))
    m = read_manifest(folder)
    if m is None:
        return False
    if not m["complete"]:
        raise CollieError(f"{folder} is a save that was never finished; load another one")
    names = sorted(m["files"])
    gone = [n for n in names if not (folder / n).is_file()]
    if gone:
        raise CollieError(f"{folder} is damaged: {_listing(gone)} missing; load an earlier "
                          "save")
    for name in names[rank::world]:
        if sha256(folder / name) != m["files"][name]:
            raise CollieError(f"{folder / name} does not match the checksum recorded when it "
                              "was saved: the file is damaged; load an earlier save")
    return True
