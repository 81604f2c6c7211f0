"""Process groups for a plan: the (pp, dp, tp) DeviceMesh and agreement across ranks.

Ranks are laid out with tp innermost (tp peers share a node), then dp, then pp.
Errors found on one rank are shared with all before anyone enters a collective that
the others would skip, so bad input fails on every rank instead of hanging.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from collie_compile.errors import CollieError

T = TypeVar("T")


def ensure_initialized() -> None:
    """Join the job torchrun started (NCCL on CUDA, gloo on CPU); a lone process without
    torchrun's variables becomes a world of one. With CUDA, gloo serves CPU tensors too
    (the plan's text, checkpoint metadata), NCCL the GPU ones."""
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=0, world_size=1)
    else:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            exit_with_launcher()
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def exit_with_launcher(interval: float = 1.0) -> None:
    """End this process when its parent (torchrun's agent) is gone. torchrun starts its
    workers in sessions of their own, so a launcher stopped by SIGKILL (or a killed process
    group) used to leave them training, and a relaunch then met them writing the same
    checkpoints."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)  # orphaned: nobody collects this job's results any more

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def local_world_size() -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE (the whole world without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size())


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_mesh(pp: int, dp: int, tp: int) -> DeviceMesh:
    """The (pp, dp, tp) mesh over the whole world."""
    world = dist.get_world_size()
    if pp * dp * tp != world:
        raise CollieError(f"the plan needs pp*dp*tp = {pp}*{dp}*{tp} = {pp * dp * tp} "
                          f"processes but {world} were launched")
    return init_device_mesh(device().type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def subgroups(mesh: DeviceMesh, sets: list[list[int]], dim: str = "tp"
              ) -> dict[tuple[int, ...], object]:
    """Groups of ranks along one mesh dim, by their index in it (tp: ranks sharing a GQA
    KV head; pp: the stages holding a tied embedding), one per coordinate of the other
    dims; every rank creates every group, in the same order, as torch requires. Returns
    this rank's group for each set it belongs to."""
    axis = mesh.mesh_dim_names.index(dim)
    lines = mesh.mesh.movedim(axis, -1).reshape(-1, mesh.mesh.shape[axis]).tolist()
    me = dist.get_rank()
    out = {}
    for line in lines:
        for s in sets:
            group = dist.new_group([line[i] for i in s])
            if me in [line[i] for i in s]:
                out[tuple(s)] = group
    return out


def agree(fn: Callable[[], T], src: int = 0) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise the first rank's error
    everywhere: a :class:`CollieError` as one, any other exception (a bug) as itself on
    its rank and as a RuntimeError naming it on the others, so that no rank goes on to
    the next collective alone."""
    err, bug, result = "", None, None
    try:
        result = fn()
    except CollieError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - shared below, then re-raised
        bug, err = e, f"\0{type(e).__name__}: {e}"
    messages = all_strings(err)
    rank, bad = next(((r, m) for r, m in enumerate(messages) if m), (None, ""))
    if bug is not None:
        raise bug
    if bad.startswith("\0"):
        raise RuntimeError(f"rank {rank} failed: {bad[1:]}")
    if bad:
        raise CollieError(bad, shared=True)
    return result


def all_strings(text: str) -> list[str]:
    """Every rank's ``text`` (UTF-8 over an all-gather of byte tensors)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes)) or 1
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:data.numel()] = data
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [bytes(o[:int(s.item())].tolist()).decode() for o, s in zip(out, sizes, strict=True)]


def broadcast_text(text: str, src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank (plain bytes: no pickles over the wire)."""
    return all_strings(text if dist.get_rank() == src else "")[src]
