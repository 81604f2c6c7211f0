"""Records to token ids and loss masks, cached on disk.

A document becomes its token ids and, per token, whether it counts in the loss: every
token of a text; the completion of a prompt/completion record; the assistant turns of a
chat, rendered with the tokenizer's chat template. Which tokens a turn covers comes from
rendering the conversation up to it (the template must render a conversation's prefix as
a prefix of the whole) and the tokenizer's character offsets, so no token is guessed.
Documents are joined with EOS between them (EOS counts when the token before it does).

The tokenizer is a local Hugging Face tokenizer folder, or with none UTF-8 bytes (ids
0-255, EOS 0). The result of a whole dataset is one safetensors file in the cache folder
(``$COLLIE_COMPILE_CACHE``, else ``~/.cache/collie-compile``), keyed by the files' names,
sizes and times, the tokenizer's files and the options; it is written whole or not at
all (a temporary file renamed into place).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import torch

from collie_compile.data.records import (
    Record,
    RecordError,
    Skipped,
    data_files,
    kind_of,
    read_records,
)
from collie_compile.disk_cache import cache_root, code_of, versions
from collie_compile.errors import CollieError, first_line

BYTE_EOS = 0
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges*", "*.model", "*.tiktoken", "chat_template*")


def tokenizer_files(folder: str | Path) -> list[Path]:
    """A tokenizer folder's own files (the folder may be a whole model's)."""
    return [f for f in sorted(Path(folder).iterdir())
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_FILES)]


class Encoder:
    """Records to (ids, counts-in-loss flags) with a local HF tokenizer or UTF-8 bytes."""

    def __init__(self, tokenizer: str | Path | None = None, vocab_size: int | None = None
                 ) -> None:
        self.path, self.vocab_size = tokenizer, vocab_size
        self.tok = _load_tokenizer(tokenizer) if tokenizer else None
        if self.tok is None:
            self.eos = BYTE_EOS
        elif self.tok.eos_token_id is None:
            raise CollieError(f"tokenizer {tokenizer} has no EOS token, which separates packed "
                              "documents; set eos_token in its tokenizer_config.json")
        else:
            self.eos = int(self.tok.eos_token_id)
        if vocab_size is not None and self.eos >= vocab_size:
            raise CollieError(f"the EOS id {self.eos} is outside the model's vocabulary of "
                              f"{vocab_size}; use a tokenizer that matches the model")

    def fingerprint(self) -> str:
        """What decides the ids: the tokenizer's files (or "bytes")."""
        if self.tok is None:
            return "bytes"
        h = hashlib.sha256()
        for f in tokenizer_files(self.path):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def encode(self, record: Record, text_field: str | None) -> tuple[list[int], list[bool]]:
        """The record's ids (EOS last) and which of them count in the loss."""
        kind = kind_of(record, text_field)
        v = record.value
        if kind == "text":
            text = v if isinstance(v, str) else v[text_field or "text"]
            ids, keep = self._tokens(text, None, special=True)
        elif kind == "prompt" and isinstance(v["prompt"], str) and isinstance(
                v["completion"], str):
            text = v["prompt"] + v["completion"]
            ids, keep = self._tokens(text, [(len(v["prompt"]), len(text))], special=True)
        else:
            messages = v["messages"] if kind == "chat" else _as_messages(record)
            first = len(_as_messages(record, prompt_only=True)) if kind == "prompt" else 0
            text, spans = self._render_chat(record, messages, first)
            ids, keep = self._tokens(text, spans, special=False)
        if not ids:
            return [], []
        if ids[-1] != self.eos:
            ids, keep = ids + [self.eos], keep + [keep[-1]]
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            raise RecordError(f"{record.source}: token id {max(ids)} is outside the model's "
                              f"vocabulary of {self.vocab_size}; use the model's tokenizer")
        return ids, keep

    def _tokens(self, text: str, spans: list[tuple[int, int]] | None, special: bool
                ) -> tuple[list[int], list[bool]]:
        """``text``'s ids; a token counts if it covers a character of one of ``spans``
        (character ranges; None: every token counts): a BPE token across a span's start
        (" the" from a prompt ending in a space) carries the span's first characters, which
        would otherwise never be learned."""
        if self.tok is None:
            data = text.encode("utf-8")
            ids = list(data)
            if spans is None:
                return ids, [True] * len(ids)
            byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
            return ids, [any(a <= i < b for a, b in byte_spans) for i in range(len(ids))]
        if spans is None:
            ids = self.tok(text, add_special_tokens=special)["input_ids"]
            return ids, [True] * len(ids)
        enc = self.tok(text, add_special_tokens=special, return_offsets_mapping=True)
        keep = [end > start and any(start < b and a < end for a, b in spans)
                for start, end in enc["offset_mapping"]]
        return enc["input_ids"], keep

    def _render_chat(self, record: Record, messages: list[dict], first: int
                     ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the chat template renders it, and the character span of
        each assistant turn from message ``first`` on."""
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            what = f"tokenizer {self.path}" if self.tok is not None else "UTF-8 bytes"
            raise RecordError(f"{record.source}: chat records need a tokenizer with a chat "
                              f"template, and {what} has none; pass --tokenizer DIR with "
                              "chat_template set, or use 'text' records")

        def render(msgs: list[dict], prompt: bool = False) -> str:
            try:
                return self.tok.apply_chat_template(msgs, tokenize=False,
                                                    add_generation_prompt=prompt)
            except Exception as e:  # noqa: BLE001 - a template error names the record
                raise RecordError(f"{record.source}: the chat template failed: "
                                  f"{first_line(e)}") from None

        text = render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first:
                continue
            before, upto = render(messages[:i], prompt=True), render(messages[:i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise RecordError(f"{record.source}: the chat template does not render a "
                                  "conversation's beginning as a prefix of it, so the "
                                  "assistant's tokens cannot be told apart; use "
                                  "prompt/completion text records")
            spans.append((len(before), len(upto)))
        if not spans:
            raise RecordError(f"{record.source}: no assistant message to learn from")
        return text, spans


def _as_messages(record: Record, prompt_only: bool = False) -> list[dict]:
    """A conversational prompt/completion record as one list of messages."""
    v = record.value
    parts = [v["prompt"]] if prompt_only else [v["prompt"], v["completion"]]
    out = []
    for part, role in zip(parts, ("user", "assistant")):
        out += part if isinstance(part, list) else [{"role": role, "content": part}]
    return out


def _load_tokenizer(path: str | Path) -> object:
    if not Path(path).is_dir():
        raise CollieError(f"tokenizer folder {path} does not exist; give a local Hugging Face "
                          "tokenizer folder (tokenizer.json, tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading failure is the folder's
        raise CollieError(f"cannot load a tokenizer from {path}: {first_line(e)}") from None
    if not tok.is_fast:
        raise CollieError(f"the tokenizer in {path} is a slow (Python) one; collie-compile "
                          "needs a fast tokenizer (tokenizer.json) for its token offsets")
    return tok


def tokenized(paths: list[str | Path], encoder: Encoder, text_field: str | None = None,
              on_error: str = "fatal", eval_fraction: float = 0.0, seed: int = 0,
              log: object = print) -> Path:
    """The cache file of the dataset ``paths`` name, tokenized (now, or by an earlier
    run): 1-D tensors ``train/ids`` and ``train/keep`` (uint8), and with
    ``eval_fraction`` ``eval/ids`` and ``eval/keep`` from that fraction of the documents
    (a seeded choice). Raises on a malformed record (``on_error="fatal"``), an empty
    dataset, or a field that is not there."""
    if not 0 <= eval_fraction < 1:
        raise CollieError(f"the eval split must be a fraction in [0, 1), got {eval_fraction}")
    files = data_files(paths)
    key_parts = [json.dumps([str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns])
                 for f in files]
    key_parts += [encoder.fingerprint(), str(text_field), on_error, repr(eval_fraction),
                  str(seed), str(encoder.vocab_size), *versions(),
                  *code_of("collie_compile.data.records", "collie_compile.data.tokenize")]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:32]
    out = cache_root() / "tokens" / f"{key}.safetensors"
    if out.is_file():
        log(f"{', '.join(map(str, paths))}: tokens cached in {out}")
        return out
    # compact per document (5 bytes a token), not Python lists (about 40)
    docs: list[tuple[torch.Tensor, torch.Tensor]] = []
    skipped = Skipped()
    for record in read_records(files, on_error, skipped):
        try:
            ids, keep = encoder.encode(record, text_field)
        except RecordError as e:
            if on_error == "fatal":
                raise RecordError(f"{e}; or pass --bad-records skip") from None
            skipped.add(str(e))
            continue
        if ids:
            docs.append((torch.tensor(ids, dtype=torch.int32),
                         torch.tensor(keep, dtype=torch.uint8)))
    names = ", ".join(map(str, paths))
    if skipped.count:
        log(f"warning: skipped {skipped.count} bad record(s) of {names}, first: "
            f"{skipped.first[0]}")
    if not docs or not any(bool(k.any()) for _, k in docs):
        raise CollieError(f"{names}: no tokens to train on (empty, or every record skipped "
                          "or masked)")
    splits = {"train": docs}
    if eval_fraction > 0:
        if len(docs) < 2:
            raise CollieError(f"{names} holds one document, which cannot be split for "
                              "evaluation; pass --eval-data")
        n = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
        held = set(torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
                   [:n].tolist())
        splits = {"train": [d for i, d in enumerate(docs) if i not in held],
                  "eval": [d for i, d in enumerate(docs) if i in held]}
    for split, chosen in splits.items():
        if not any(bool(k.any()) for _, k in chosen):
            raise CollieError(f"{names}: the {split} split has no tokens that count in the "
                              "loss; use more data or a larger --eval-split")
    tensors = {}
    for split, chosen in splits.items():
        tensors[f"{split}/ids"] = torch.cat([ids for ids, _ in chosen])
        tensors[f"{split}/keep"] = torch.cat([keep for _, keep in chosen])
    meta = {"documents": json.dumps({s: len(c) for s, c in splits.items()}),
            "skipped": str(skipped.count), "eos": str(encoder.eos)}
    _write_atomic(out, tensors, meta)
    log(f"tokenized {len(docs)} documents of {names}: "
        f"{sum(t.numel() for k, t in tensors.items() if k.endswith('/ids')):,} tokens "
        f"(cached in {out})")
    return out


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        raise CollieError(f"cannot write the token cache in {path.parent} ({e.strerror}); "
                          "set COLLIE_COMPILE_CACHE to a writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)
