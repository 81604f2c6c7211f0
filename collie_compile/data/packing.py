"""Packed sequences: a token stream cut into rows of ``seq_len``, read row by row.

Sequence k is tokens [k·seq_len, (k+1)·seq_len) of the stream (documents back to back,
EOS between them); the last one is padded with EOS that does not count. Targets are the
tokens that count in the loss, -100 elsewhere. An epoch visits every sequence once, in a
seeded order of its own; training position p (sequences consumed so far, over epochs)
names one sequence, so a global batch, and each data-parallel rank's rows of it, follow
from the position alone: that is what a checkpoint records, and a resumed or re-planned
run reads on from there. A stream kept in the tokenization cache (a safetensors file) is
read a slice at a time, so a rank reads only the rows it trains on; ``tokens_read``
counts them.

With ``separate_documents`` rows also carry ``position_ids`` that restart after each EOS
(and at the row's start), and each document's first token does not count, as
transformers' ``DataCollatorWithFlattening`` makes them: the model then keeps every
document to itself instead of letting it attend to the ones before it in the row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from collie_compile.errors import CollieError

IGNORE_INDEX = -100
_DIGEST_CHUNK = 1 << 24  # tokens hashed at a time


class PackedTokens:
    """Rows of ``seq_len`` tokens over one stream of ids and counts-in-loss flags."""

    def __init__(self, ids: torch.Tensor, keep: torch.Tensor, seq_len: int, eos: int,
                 seed: int = 0, name: str = "data", separate_documents: bool = False) -> None:
        self._ids, self._keep = ids, keep  # 1-D tensors, or safetensors slices
        self.num_tokens = int(ids.get_shape()[0] if hasattr(ids, "get_shape") else len(ids))
        self.seq_len, self.eos, self.seed, self.name = seq_len, eos, seed, name
        self.separate_documents = separate_documents
        self.num_sequences = -(-self.num_tokens // seq_len)
        self.tokens_read = 0
        self._orders: dict[int, list[int]] = {}
        self._digest: str | None = None
        if self.num_sequences == 0:
            raise CollieError(f"{name} holds no tokens")

    def digest(self) -> str:
        """SHA-256 of the token stream and its counts-in-loss flags: what the rows are made
        of (another file, order, text or tokenizer changes it). Read once, in chunks."""
        if self._digest is None:
            h = hashlib.sha256()
            for t in (self._ids, self._keep):
                for start in range(0, self.num_tokens, _DIGEST_CHUNK):
                    h.update(t[start:start + _DIGEST_CHUNK].contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    @classmethod
    def from_cache(cls, path: str | Path, split: str, seq_len: int, seed: int = 0,
                   name: str | None = None, separate_documents: bool = False
                   ) -> PackedTokens:
        """Split ``split`` ("train" or "eval") of a :func:`~.tokenize.tokenized` file,
        read lazily."""
        from safetensors import safe_open

        f = safe_open(str(path), framework="pt")
        eos = int(f.metadata()["eos"])
        return cls(f.get_slice(f"{split}/ids"), f.get_slice(f"{split}/keep"), seq_len, eos,
                   seed, name or split, separate_documents)

    @classmethod
    def from_documents(cls, documents: object, seq_len: int, eos: int, seed: int = 0,
                       separate_documents: bool = False) -> PackedTokens:
        """A user's tokenized documents: a sequence of dicts with ``input_ids`` and
        optionally ``labels`` (-100 where a token does not count), as a tokenized
        ``datasets.Dataset`` holds them; EOS is added after each that lacks it."""
        ids: list[int] = []
        keep: list[bool] = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, dict) or "input_ids" not in doc:
                raise CollieError(f"document {i} is not a dict with 'input_ids'")
            d_ids = [int(t) for t in doc["input_ids"]]
            labels = doc.get("labels")
            d_keep = ([int(t) != IGNORE_INDEX for t in labels] if labels is not None
                      else [True] * len(d_ids))
            if len(d_keep) != len(d_ids):
                raise CollieError(f"document {i}: {len(d_keep)} labels for {len(d_ids)} "
                                  "input_ids")
            if d_ids and d_ids[-1] != eos:
                d_ids, d_keep = d_ids + [eos], d_keep + [d_keep[-1]]
            ids += d_ids
            keep += d_keep
        return cls(torch.tensor(ids, dtype=torch.int32), torch.tensor(keep, dtype=torch.uint8),
                   seq_len, eos, seed, separate_documents=separate_documents)

    def order(self, epoch: int) -> list[int]:
        """The sequences of ``epoch`` in the order it visits them."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.num_sequences, generator=gen).tolist()}
        return self._orders[epoch]

    def sequence_at(self, position: int, shuffle: bool = True) -> int:
        """The sequence training position ``position`` reads (over epochs)."""
        epoch, i = divmod(position, self.num_sequences)
        return self.order(epoch)[i] if shuffle else i

    def rows(self, sequences: list[int]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``labels`` [len(sequences), seq_len] of those sequences (a
        negative index: a row that counts nothing, padding a last batch), and their
        ``position_ids`` with ``separate_documents``."""
        n, s = len(sequences), self.seq_len
        ids = torch.full((n, s), self.eos, dtype=torch.long)
        labels = torch.full((n, s), IGNORE_INDEX, dtype=torch.long)
        for r, k in enumerate(sequences):
            if k < 0:
                continue
            a, b = k * s, min((k + 1) * s, self.num_tokens)
            row = torch.as_tensor(self._ids[a:b]).long()
            kept = torch.as_tensor(self._keep[a:b]).bool()
            ids[r, :b - a] = row
            labels[r, :b - a] = torch.where(kept, row, IGNORE_INDEX)
            self.tokens_read += b - a
        if not self.separate_documents:
            return {"input_ids": ids, "labels": labels}
        return {"input_ids": ids, "labels": labels, **document_positions(ids, labels, self.eos)}

    def batch(self, position: int, global_batch: int, rows: slice | None = None,
              shuffle: bool = True) -> dict[str, torch.Tensor]:
        """The global batch at training ``position`` (sequences position ..
        position + global_batch - 1), or only its ``rows``."""
        picked = range(global_batch)[rows or slice(None)]
        return self.rows([self.sequence_at(position + i, shuffle) for i in picked])

    def eval_batches(self, global_batch: int, rows: slice | None = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """Every sequence once, in order, in global batches (the last padded with rows
        that count nothing), or each batch's ``rows``."""
        for start in range(0, self.num_sequences, global_batch):
            ks = [k if k < self.num_sequences else -1
                  for k in range(start, start + global_batch)]
            yield self.rows(ks[rows or slice(None)])


def document_positions(ids: torch.Tensor, labels: torch.Tensor, eos: int
                       ) -> dict[str, torch.Tensor]:
    """``position_ids`` counting from 0 at each row's start and after each ``eos``, and
    ``labels`` without each document's first token (nothing in its document predicts
    it: DataCollatorWithFlattening's -100)."""
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos
    index = torch.arange(ids.shape[1]).expand_as(ids)
    # position = index - index of the latest start at or before it
    latest = torch.where(starts, index, 0).cummax(dim=1).values
    return {"position_ids": index - latest, "labels": labels.masked_fill(starts, IGNORE_INDEX)}
