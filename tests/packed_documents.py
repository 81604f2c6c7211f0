"""Documents packed into rows as users pack them (transformers' DataCollatorWithFlattening),
and what packing means: each document's logits as if it were alone."""

from __future__ import annotations

import torch


def flattened_rows(rows: int, seq: int, vocab: int, longest: int, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """``rows`` rows of ``seq`` tokens, each documents of 1..``longest`` random tokens
    flattened by DataCollatorWithFlattening: positions restart per document, and each
    document's first label is -100."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    collate, out = DataCollatorWithFlattening(return_tensors="pt"), []
    for _ in range(rows):
        docs, left = [], seq
        while left:
            n = min(left, int(torch.randint(1, longest + 1, (1,), generator=g)))
            docs.append({"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()})
            left -= n
        out.append(collate(docs))
    return {k: torch.cat([r[k] for r in out]) for k in ("input_ids", "labels", "position_ids")}


@torch.no_grad()
def each_document_alone(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor
                        ) -> torch.Tensor:
    """The logits of one packed row's documents, each run through ``model`` by itself."""
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
    return torch.cat([model(input_ids=ids[None, a:b]).logits[0]
                      for a, b in zip(starts, starts[1:])])
