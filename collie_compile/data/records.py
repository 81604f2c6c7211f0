"""Training records out of files: plain text, JSON Lines and Parquet.

A ``.txt``/``.text``/``.md`` file is one document. A JSON Lines file (``.jsonl``,
``.json``) holds one object per line and a Parquet file one per row (read with pyarrow,
the ``parquet`` extra). Every record carries where it came from (``file:line`` or
``file:row``), so that a malformed one is reported there; ``on_error="skip"`` leaves it
out and counts it instead of stopping.

What a record means (:func:`kind_of`): with ``text_field`` that field's text; otherwise
``messages`` (chat turns with roles), ``prompt`` and ``completion``, or ``text``, in that
order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from collie_compile.errors import CollieError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
ON_ERROR = ("fatal", "skip")


class RecordError(CollieError):
    """A record that cannot be used; the message starts with its ``file:line``."""


@dataclass
class Record:
    """One record and where it came from."""

    source: str  # "file:line" (JSON Lines), "file:row" (Parquet) or "file" (text)
    value: dict | str


@dataclass
class Skipped:
    """Records left out under ``on_error="skip"``: how many, and the first few reasons."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(reason)


def data_files(paths: list[str | Path]) -> list[Path]:
    """The files ``paths`` name (a folder: its files of a known kind, sorted; not hidden
    ones, nor a README.md dataset card)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # not hidden folders (.ipynb_checkpoints, .git) nor a dataset card
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                           and not any(part.startswith(".")
                                       for part in f.relative_to(path).parts)
                           and f.name.lower() != "readme.md")
            if not found:
                raise CollieError(f"{path} holds no data files ({', '.join(SUFFIXES)})")
            out += found
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise CollieError(f"{path}: unknown data format {path.suffix or '(none)'!r}; "
                                  f"use one of {', '.join(SUFFIXES)}")
            out.append(path)
        else:
            raise CollieError(f"no data file or folder {path}")
    return out


def read_records(paths: list[str | Path], on_error: str = "fatal",
                 skipped: Skipped | None = None) -> Iterator[Record]:
    """Every record of the files ``paths`` name, in order."""
    if on_error not in ON_ERROR:
        raise CollieError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    for path in data_files(paths):
        if path.suffix in TEXT_SUFFIXES:
            yield Record(str(path), _read_text(path))
        elif path.suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(path, on_error, skipped)
        else:
            yield from _read_parquet(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CollieError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CollieError(f"cannot read {path}: {e.strerror}") from None


def _read_jsonl(path: Path, on_error: str, skipped: Skipped | None) -> Iterator[Record]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise CollieError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(raw.decode("utf-8"))
                if not isinstance(value, dict):
                    raise ValueError(f"a JSON {type(value).__name__}, not an object")
            except ValueError as e:  # UnicodeDecodeError too
                reason = f"{where}: not a JSON object ({str(e).splitlines()[0]})"
                if on_error == "fatal" or skipped is None:
                    raise RecordError(reason + "; fix the line, or pass --bad-records skip"
                                      ) from None
                skipped.add(reason)
                continue
            yield Record(where, value)


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CollieError(f"{path}: reading Parquet needs pyarrow; pip install "
                          "'collie-compile[parquet]'") from None
    try:
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                yield Record(f"{path}:row {row}", value)
                row += 1
    except OSError as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise CollieError(f"{path}: not a readable Parquet file ({e})") from None
    except ValueError as e:
        raise CollieError(f"{path}: not a readable Parquet file ({e})") from None


def _check_messages(record: Record, field_name: str, msgs: object) -> None:
    if not (isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in msgs)):
        raise RecordError(f"{record.source}: {field_name!r} must be a non-empty list of "
                          "{'role': ..., 'content': ...} objects with text content")


def kind_of(record: Record, text_field: str | None) -> str:
    """What the record holds: "text", "chat" (messages) or "prompt" (prompt/completion);
    raises a :class:`RecordError` naming the record when it holds none of them."""
    v = record.value
    if isinstance(v, str):
        return "text"
    if text_field is not None:
        if text_field not in v:
            raise RecordError(f"{record.source}: no field {text_field!r} (it has "
                              f"{', '.join(map(repr, v)) or 'none'}); name the text with "
                              "--text-field")
        if not isinstance(v[text_field], str):
            raise RecordError(f"{record.source}: field {text_field!r} is "
                              f"{type(v[text_field]).__name__}, not text")
        return "text"
    if "messages" in v:
        _check_messages(record, "messages", v["messages"])
        return "chat"
    if "prompt" in v and "completion" in v:
        kinds = {type(v[k]) for k in ("prompt", "completion")}
        if kinds == {list}:
            for k in ("prompt", "completion"):
                _check_messages(record, k, v[k])
        elif kinds != {str}:
            raise RecordError(f"{record.source}: 'prompt' and 'completion' must both be text, "
                              "or both lists of chat messages")
        return "prompt"
    if "text" in v:
        if not isinstance(v["text"], str):
            raise RecordError(f"{record.source}: field 'text' is "
                              f"{type(v['text']).__name__}, not text")
        return "text"
    raise RecordError(f"{record.source}: none of the fields 'messages', 'prompt'/'completion' "
                      f"or 'text' (it has {', '.join(map(repr, v)) or 'none'}); name the text "
                      "field with --text-field")
