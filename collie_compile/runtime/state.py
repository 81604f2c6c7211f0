"""Checkpoints in safetensors, written and read as boxes of global tensors.

Every tensor a rank holds (a parameter or an optimizer state) is a box of a global
tensor: a tensor-parallel slice, further cut along dim 0 by FSDP under ZeRO 2/3. A
training checkpoint stores each box once, with its global offset, in the writing rank's
safetensors file; ``index.json`` lists where every box lives. Loading works box against
box, so a run can resume under another plan or GPU count: each rank reads only the parts
of files that overlap what it now holds (safetensors reads slices without loading the
rest). A Hugging Face checkpoint directory is the special case of whole tensors, which is
how ``weights=DIR`` loads a model no rank could hold whole.

Which folder a save may write, and how it is put in place and verified:
:mod:`collie_compile.runtime.folders`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError

if TYPE_CHECKING:
    from collie_compile.passes.tensor_parallel import Shard

FORMAT = "collie-compile-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Box:
    """Where a local tensor sits in its global tensor."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """A stored box: file, key in it, and placement."""

    file: Path
    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def local_boxes(t: torch.Tensor, tp_shard: Shard | None, tp_rank: int,
                full_shape: tuple[int, ...]) -> list[tuple[Box, tuple[slice, ...]]]:
    """The boxes of ``t`` (a parameter or state of one, on tp rank ``tp_rank``) in the
    global tensor of ``full_shape``, each with the index of its part of the local tensor:
    the FSDP chunk when ``t`` is a DTensor, placed through the tp slice (one box per
    contiguous run: a fused projection's slice has one per part)."""
    offset, shape = [0] * len(full_shape), list(t.shape)
    if hasattr(t, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, local_off = compute_local_shape_and_global_offset(
            t.shape, t.device_mesh, t.placements)
        offset, shape = list(local_off), list(local_shape)
    whole = tuple(slice(None) for _ in shape)
    if tp_shard is None:
        return [(Box(tuple(offset), tuple(shape), tuple(full_shape)), whole)]
    d = tp_shard.dim
    out = []
    for start, at, length in tp_shard.global_ranges(tp_rank, offset[d], offset[d] + shape[d]):
        o, sh, idx = list(offset), list(shape), list(whole)
        o[d], sh[d] = start, length
        idx[d] = slice(at - offset[d], at - offset[d] + length)
        out.append((Box(tuple(o), tuple(sh), tuple(full_shape)), tuple(idx)))
    return out


def read_local(pieces: list[Piece], boxes: list[tuple[Box, tuple[slice, ...]]],
               shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A local tensor of ``shape`` assembled from its :func:`local_boxes`."""
    out = None
    for box, idx in boxes:
        part = read_box(pieces, box, name)
        if out is None:
            out = torch.empty(shape, dtype=part.dtype)
        out[idx] = part
    return out if out is not None else torch.empty(shape)


def write_rank_file(path: Path, tensors: dict[str, list[tuple[torch.Tensor, Box]]]) -> dict:
    """Save this rank's boxes (several per name where its slice is not contiguous);
    return their index entries."""
    data, entries = {}, {}
    for name, boxes in tensors.items():
        for i, (t, b) in enumerate(boxes):
            key = name if i == 0 else f"{name}#{i}"
            data[key] = local_tensor(t).detach().contiguous().cpu()
            entries.setdefault(name, []).append(
                {"file": path.name, "key": key, "offset": list(b.offset),
                 "shape": list(b.shape), "global_shape": list(b.global_shape)})
    save_file(data, str(path))
    return entries


def read_index(directory: Path) -> tuple[dict, dict[str, list[Piece]]]:
    """(metadata, pieces per tensor name) of a training checkpoint."""
    index = Path(directory) / "index.json"
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CollieError(f"{directory} is not a readable collie-compile checkpoint "
                          f"({e}); pass the directory save_checkpoint wrote") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CollieError(f"{index} is not a version-{VERSION} collie-compile checkpoint")
    pieces: dict[str, list[Piece]] = {}
    try:
        for name, entries in meta["tensors"].items():
            pieces[name] = [Piece(Path(directory) / e["file"], e.get("key", name),
                                  tuple(e["offset"]),
                                  tuple(e["shape"])) for e in entries]
    except (KeyError, TypeError) as e:
        raise CollieError(f"{index} is corrupted ({e}); re-save the checkpoint") from None
    return meta, pieces


def hf_pieces(directory: Path) -> dict[str, list[Piece]]:
    """Whole-tensor pieces of a Hugging Face safetensors checkpoint (one file or sharded
    with model.safetensors.index.json)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CollieError(f"{index} is corrupted ({e})") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CollieError(f"no model.safetensors (or its index) in {directory}; give a "
                          "Hugging Face checkpoint directory saved with safetensors")
    pieces: dict[str, list[Piece]] = {}
    for f in files:
        path = directory / f
        try:
            with safe_open(str(path), "pt") as fh:
                for key in fh.keys():
                    shape = tuple(fh.get_slice(key).get_shape())
                    pieces.setdefault(key, []).append(Piece(path, key, (0,) * len(shape),
                                                            shape))
        except Exception as e:  # safetensors raises its own error types
            raise CollieError(f"cannot read {path}: {e}; the file is damaged") from None
    return pieces


def read_box(pieces: list[Piece], box: Box, name: str) -> torch.Tensor:
    """Assemble ``box`` of tensor ``name`` from the stored pieces overlapping it."""
    numel = 1
    for s in box.shape:
        numel *= s
    if numel == 0:  # an empty FSDP chunk
        return torch.empty(box.shape)
    out = None
    covered = 0
    for pc in pieces:
        if len(pc.shape) != len(box.shape):
            raise CollieError(f"{name} has {len(pc.shape)} dims in the checkpoint but "
                              f"{len(box.shape)} in the model; is it for another model?")
        lo = [max(a, b) for a, b in zip(box.offset, pc.offset, strict=True)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(box.offset, box.shape, pc.offset,
                                                      pc.shape, strict=True)]
        if any(h <= l_ for l_, h in zip(lo, hi, strict=True)):
            continue
        src = tuple(slice(l_ - o, h - o) for l_, h, o in zip(lo, hi, pc.offset, strict=True))
        dst = tuple(slice(l_ - o, h - o) for l_, h, o in zip(lo, hi, box.offset, strict=True))
        try:
            with safe_open(str(pc.file), "pt") as fh:
                part = fh.get_slice(pc.key)[src] if src else fh.get_tensor(pc.key)
        except Exception as e:  # safetensors raises its own error types
            raise CollieError(f"cannot read {name} from {pc.file}: {e}; the checkpoint is "
                              "damaged") from None
        if out is None:
            out = torch.empty(box.shape, dtype=part.dtype)
        out[dst] = part
        covered += part.numel()
    if out is None or covered < numel:
        raise CollieError(f"the checkpoint does not cover all of {name} "
                          f"(box at {list(box.offset)} of shape {list(box.shape)})")
    return out
