"""Measure a real training step's peak memory, to check the cost model against.

Runs single-process training steps of a preset (real weights, real optimizer, real
recomputation): on the CPU under torch's ``MemTracker``, which follows every tensor
allocation by category; on a CUDA device by the caching allocator's
``max_memory_allocated`` from the second step on, less what was allocated before the
model (cuBLAS's workspace, warmed first). Attention runs as the runtime runs it
(:mod:`collie_compile.models.attention`: ``is_causal``, K/V expanded where the device has no
fused grouped-query kernel). The steady-state peak is what :mod:`collie_compile.cost.memory`
predicts for a layout of one GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from collie_compile.dtypes import torch_dtype
from collie_compile.models.registry import build_model, load_config
from collie_compile.optim.optimizers import optimizer_class, single_process_optimizer
from collie_compile.recompute_policy import enable_on_hf_model


@dataclass(frozen=True)
class MeasuredPeak:
    total_bytes: int
    by_category: dict[str, int]


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float = 1e-3,
                   update_in_backward: bool = False) -> torch.optim.Optimizer:
    """A real optimizer for single-process runs (per-tensor loops, as the cost model
    counts), updating after backward or, with ``update_in_backward``, inside it."""
    cls = optimizer_class(name, params[0].dtype)  # raises a clear error for unknown names
    per_tensor = (cls is not None and cls.__module__.startswith("torch.")
                  and not update_in_backward)
    return single_process_optimizer(name, params, lr, {"foreach": False} if per_tensor else {},
                                    update_in_backward)


def _frozen_as_buffers(net: torch.nn.Module) -> None:
    """Re-register frozen parameters as buffers: the same tensors, read the same way in
    forward, still counted by MemTracker, which cannot track a frozen parameter (it hooks
    every parameter's gradient)."""
    for mod in net.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if not p.requires_grad:
                delattr(mod, name)
                mod.register_buffer(name, p.detach())


def measure_peak(model: str, optimizer: str = "adamw", recompute: str = "none",
                 dtype: str = "fp32", batch: int = 2, seq_len: int = 128, steps: int = 2,
                 seed: int = 0, lora_rank: int | None = None, device: str = "cpu",
                 update_in_backward: bool = False) -> MeasuredPeak:
    """Peak bytes of ``steps`` training steps (states exist from the first step on). With
    ``lora_rank``, peft's LoRA on q_proj/v_proj trains and the base is frozen. On a CUDA
    ``device`` the categories are not known (``by_category`` is empty)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        base = _cuda_baseline(dev, torch_dtype(dtype))
    torch.manual_seed(seed)
    cfg = load_config(model)
    net = build_model(cfg, device=dev, dtype=torch_dtype(dtype))
    net.train()
    enable_on_hf_model(net, recompute)
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=lora_rank, target_modules=["q_proj", "v_proj"]))
        _frozen_as_buffers(net)
    opt = make_optimizer(optimizer, [p for p in net.parameters() if p.requires_grad],
                         update_in_backward=update_in_backward)
    ids = torch.randint(0, int(cfg.vocab_size), (batch, seq_len), device=dev)
    if dev.type == "cuda":
        # The first step allocates the optimizer's states and autotunes the Triton kernels,
        # whose benchmarking takes a one-off 256 MiB buffer: count from the second on.
        _train_step(net, opt, ids)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(max(1, steps - 1)):
            _train_step(net, opt, ids)
        return MeasuredPeak(torch.cuda.max_memory_allocated(dev) - base, {})
    tracker = MemTracker()
    tracker.track_external(net, opt)
    with tracker:
        for step in range(steps):
            if step:
                tracker.reset_mod_stats()  # per-module stats only; the peak is kept
            _train_step(net, opt, ids)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    cats = {str(k).split(".")[-1].lower(): int(v) for k, v in peak.items() if str(k) != "Total"}
    return MeasuredPeak(int(peak["Total"]), cats)


def _train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    net(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _cuda_baseline(dev: torch.device, dtype: torch.dtype) -> int:
    """Allocated bytes once cuBLAS holds its workspaces (a linear with bias, forward and
    backward, in the run's dtype), with the peak counter reset to it."""
    x = torch.ones(8, 8, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(8, 8, device=dev, dtype=dtype, requires_grad=True)
    torch.nn.functional.linear(x, w, torch.ones(8, device=dev, dtype=dtype)).sum().backward()
    del x, w
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive in this process while active: every storage an
    op makes counts until Python frees it, at its current size (FSDP2 resizes storages in
    place), plus the tensors handed to :meth:`hold` (weights, states made before). Unlike
    MemTracker it follows no modules, so a module may run many times in a step (micro-
    batches, pipeline schedules). Sized for small test models: it re-sums every op."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)
        self._update()

    def _add(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # DTensor: its local shard holds the bytes
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._add(inner)
            return
        if t.device.type == "meta" or isinstance(t, FakeTensor):  # no memory behind them
            return
        st = t.untyped_storage()
        key = st._cdata
        if key not in self._alive:
            self._alive[key] = weakref.ref(st, lambda _, key=key: self._alive.pop(key, None))

    def _update(self) -> None:
        live = sum(st.nbytes() for ref in list(self._alive.values())
                   if (st := ref()) is not None)
        self.peak = max(self.peak, live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self._update()
        return out
