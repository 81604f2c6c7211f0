"""Data parallelism: gradient reduction over the data-parallel group, and ZeRO.

- ZeRO 0 and 1: :class:`GradReducer` all-reduces gradients in fixed buckets as soon as
  backward finishes them, overlapped with the rest of backward (DDP's algorithm). We
  keep our own rather than wrapping in DDP because it counts gradient accumulations: a
  bucket is reduced on the *last* micro-batch's backward, whichever schedule runs the
  micro-batches (a plain loop or a torch.distributed.pipelining schedule), and it is the
  place where fused-in-backward optimizers hook their update. ZeRO-1 shards optimizer
  states with torch's ``ZeroRedundancyOptimizer`` (chosen in the runtime).
- ZeRO 2 and 3: FSDP2 (``fully_shard``) on every outlined block, then on the stage:
  parameters, gradients and states sharded over dp; ZeRO-3 frees each block's gathered
  weights after its forward, ZeRO-2 keeps them until backward. FSDP2 works on plain
  (tp-local) tensors and pipelining stages drive its gradient sync, so it composes with
  the tensor-parallel and pipeline passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.device_mesh import DeviceMesh

DEFAULT_BUCKET_BYTES = 25 * 2**20


class GradReducer:
    """Bucketed, overlapped all-reduce (sum) of gradients over ``group``.

    Parameters are bucketed in reverse order (backward produces the last layers' grads
    first). A parameter counts as ready after ``accumulations`` gradient accumulations;
    full buckets are launched in bucket order, so every rank issues the same collectives
    in the same order. :meth:`finish` waits for all and writes the sums back.

    ``on_ready(p)``, when set, is called for each parameter as soon as its reduced
    gradient is written back (buckets in order, as their all-reduces complete): the hook
    for optimizer updates fused into backward.
    """

    def __init__(self, params: list[torch.nn.Parameter], group: dist.ProcessGroup,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.group = group
        self.accumulations = 1
        self.on_ready: Callable[[torch.nn.Parameter], None] | None = None
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b]
        self.reset()

    def reset(self) -> None:
        self._seen: dict[int, int] = {}
        self._ready = [0] * len(self.buckets)
        self._launched = 0
        self._pending: list[tuple[dist.Work, torch.Tensor, list[torch.nn.Parameter]]] = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        n = self._seen.get(id(p), 0) + 1
        self._seen[id(p)] = n
        if n != self.accumulations:
            return
        b = self._bucket_of[id(p)]
        self._ready[b] += 1
        while (self._launched < len(self.buckets)
               and self._ready[self._launched] == len(self.buckets[self._launched])):
            self._launch(self._launched)
            self._launched += 1

    def _launch(self, b: int) -> None:
        params = self.buckets[b]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self._pending.append((dist.all_reduce(flat, group=self.group, async_op=True),
                              flat, params))
        if self.on_ready is not None:
            self._drain(wait=False)

    def _drain(self, wait: bool) -> None:
        """Write back the reduced buckets, in order: all of them, or (``wait=False``)
        those whose all-reduce has completed."""
        while self._pending and (wait or self._pending[0][0].is_completed()):
            work, flat, params = self._pending.pop(0)
            work.wait()
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()
            if self.on_ready is not None:
                for p in params:
                    self.on_ready(p)

    def finish(self) -> None:
        """Reduce what is left (parameters unused this step get zero gradients), wait for
        every bucket and write the reduced gradients back."""
        for b in range(self._launched, len(self.buckets)):
            for p in self.buckets[b]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._launch(b)
        self._drain(wait=True)
        self.reset()


def data_parallel(gm: fx.GraphModule, mesh: DeviceMesh | None, zero: int, prefix: str,
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> fx.GraphModule:
    """Make ``gm`` (one pipeline stage) data-parallel over the 1-D ``mesh``.

    ZeRO 0/1 attach a :class:`GradReducer` as ``gm.meta["grad_reducer"]``; ZeRO 2/3
    apply FSDP2 to each block submodule under ``prefix`` and to ``gm``. A mesh of size 1
    (or None) leaves ``gm`` as it is. Gradients are summed, not averaged: the runtime
    scales the loss by the global token count.
    """
    if mesh is None or mesh.size() == 1:
        return gm
    if zero in (0, 1):
        gm.meta["grad_reducer"] = GradReducer(list(gm.parameters()), mesh.get_group(),
                                              bucket_bytes)
        return gm
    from torch.distributed.fsdp import fully_shard

    reshard = zero == 3
    blocks = gm.get_submodule(prefix.rstrip(".")) if _has(gm, prefix.rstrip(".")) else None
    units = list(blocks.children()) if blocks is not None else []
    for block in units:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(gm, mesh=mesh, reshard_after_forward=reshard)
    for unit in [*units, gm]:  # sum, with plain SUM collectives (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return gm


def _has(gm: torch.nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False
