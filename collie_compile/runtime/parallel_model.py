"""``parallelize``: a plan turned into per-rank programs that train.

Every rank captures the model at the plan's micro-batch shape, applies the passes for
its coordinates in the (pp, dp, tp) mesh (tensor_parallel -> outline_blocks ->
pipeline_split -> recompute -> data_parallel), and drives its stages: a plain loop over
micro-batches when pp = 1, a torch.distributed.pipelining schedule otherwise.

Loss convention: each micro-batch contributes sum(token losses) / (valid tokens in the
global batch) and gradients are summed over micro-batches and data-parallel ranks, so
loss and gradients equal those of one process on the whole batch with HF's mean loss.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture_static
from collie_compile.cost.estimate import check_heads
from collie_compile.cost.hardware import CATALOG, local_gpu
from collie_compile.dtypes import dtype_name, torch_dtype
from collie_compile.errors import CollieError, flag, named
from collie_compile.kernels.adalomo import adalomo_state
from collie_compile.layout import DEFAULT_LORA_TARGETS, canonical_lora_targets, vocab_parallel
from collie_compile.models.attention import fused_gqa
from collie_compile.models.probe import attention_heads
from collie_compile.models.registry import load_config, model_name, tied_names
from collie_compile.optim.in_backward import CLIP_MODES, FusedBackward, LossScaler
from collie_compile.optim.optimizers import DEFAULT_LR, optimizer_class, optimizer_options
from collie_compile.passes.data_parallel import data_parallel
from collie_compile.passes.expand_kv import expand_grouped_kv
from collie_compile.passes.lora import lora as lora_pass
from collie_compile.passes.move_to_device import move_to_device
from collie_compile.passes.outline_blocks import outline_blocks
from collie_compile.passes.pipeline_split import pipeline_split
from collie_compile.passes.recompute import recompute as recompute_pass
from collie_compile.passes.tensor_parallel import tensor_parallel, vocab_parallel_cross_entropy
from collie_compile.planner.result import Plan, lora_flags
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime import state as ckpt

IGNORE_INDEX = -100


@dataclass
class Coordinates:
    """Where this rank sits in the (pp, dp, tp) mesh."""

    pp: int
    dp: int
    tp: int


def parallelize(model: torch.nn.Module, gpus: int | None = None,
                plan: str | Plan | Path = "auto", optimizer: str | None = None,
                lr: float | None = None, optimizer_kwargs: dict | None = None,
                seq_len: int | None = None, global_batch_size: int | None = None,
                gpu: str | None = None, dtype: str | None = None, dp: int | None = None,
                tp: int | None = None, pp: int | None = None, zero: int | None = None,
                micro_batch_size: int | None = None, schedule: str | None = None,
                recompute: str | None = None, weights: str | Path | None = None,
                lora: object | None = None, lora_rank: int | None = None,
                lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                lora_dropout: float = 0.0, lora_adapter: str | Path | None = None,
                max_grad_norm: float | None = None, clip_mode: str = "two-pass",
                clip_value: float | None = None, loss_scale: str | float | None = None,
                stochastic_rounding: bool = False, memory_reserve: float | None = None
                ) -> ParallelModel:
    """Split ``model`` over the ranks of this torchrun job and return its trainer.

    Call once on every rank with the same arguments. ``plan`` is ``"auto"`` (solve it
    with the pins given: dp, tp, pp, zero, micro_batch_size, schedule, recompute), a
    :class:`Plan`, or a plan JSON file from ``collie-compile plan --out``; the optimizer
    defaults to the plan's (adamw for "auto"), the dtype is the model's weights'. An auto
    plan is made for ``gpu`` (a catalog name or spec file; default: the CUDA device this
    runs on, with the memory torch reports, or a100-80gb on a CPU), keeping the fraction
    ``memory_reserve`` (default 0.05) of each GPU's memory free for other processes and
    allocator slack; a plan given keeps the reserve it was priced with. A model too big
    for one device comes on the meta device with ``weights=DIR`` (a Hugging Face
    safetensors checkpoint): each rank reads only the slices it holds.

    LoRA: ``lora=peft.LoraConfig(...)`` or ``lora_rank=, lora_alpha=, lora_targets=``
    (``target_modules`` as peft matches them); ``lora_adapter=DIR`` continues a saved PEFT
    adapter. Only the adapters train; ``save_pretrained`` then writes a PEFT adapter.
    ``max_grad_norm`` clips the whole model's gradient norm before each step.

    ``optimizer="lomo"`` or ``"adalomo"`` update each parameter inside backward (see
    :mod:`collie_compile.optim.in_backward`): ``clip_mode`` ("two-pass" or "stale") says how
    they clip to ``max_grad_norm``, ``clip_value`` clips elementwise, ``loss_scale``
    ("dynamic" or a fixed number) scales the loss for fp16 and skips a step that
    overflows, and ``stochastic_rounding`` rounds updates into 16-bit weights randomly.
    """
    cdist.ensure_initialized()
    world = dist.get_world_size()
    cfg = cdist.agree(lambda: load_config(model.config))  # one stack of blocks, or why not
    name = model_name(cfg)
    dtype = model_dtype(model, dtype)

    fused = FusedOptions(max_grad_norm, clip_mode, clip_value, loss_scale, stochastic_rounding)

    lora_cfg = cdist.agree(lambda: lora_config(lora, lora_rank, lora_alpha, lora_targets,
                                               lora_dropout))
    adapter = cdist.agree(lambda: read_adapter(lora_adapter)) if lora_adapter else None
    if adapter is not None and lora_cfg is None:
        lora_cfg = adapter[0]

    why = cdist.agree(lambda: loss_refusal(cfg))
    if why:
        raise CollieError(why)
    refusal = None
    if str(plan).lower() == "auto" and world > 1 and tp != 1:  # can tp run this model?
        refusal = cdist.broadcast_text(cdist.agree(
            lambda: (tp_refusal(cfg) or "") if dist.get_rank() == 0 else "")) or None

    def resolve() -> Plan:
        if optimizer is not None:
            fused.check(optimizer)
        if gpus is not None and gpus != world:
            raise CollieError(f"gpus={gpus} but this job has {world} processes; launch "
                              f"torchrun with --nproc-per-node (x nodes) = {gpus}, or pass "
                              f"gpus={world}")
        p = _resolve_plan(plan, cfg, name, world, gpu, optimizer, dtype, seq_len,
                          global_batch_size, dict(dp=dp, tp=tp, pp=pp, zero=zero,
                                                  micro_batch_size=micro_batch_size,
                                                  schedule=schedule, recompute=recompute),
                          lora_cfg, memory_reserve, refusal)
        fused.check(optimizer or p.optimizer)
        return p

    # Rank 0's plan for everyone: the solver is deterministic, but one answer is safer.
    solved = cdist.agree(resolve)
    chosen_plan = Plan.from_json(cdist.broadcast_text(solved.to_json()))
    optimizer = optimizer or chosen_plan.optimizer
    return ParallelModel(model, chosen_plan, optimizer, lr, optimizer_kwargs or {}, weights,
                         lora_cfg, adapter[1] if adapter else None, fused)


@dataclass(frozen=True)
class FusedOptions:
    """Clipping, loss scaling and rounding: ``parallelize``'s arguments, checked."""

    max_grad_norm: float | None = None
    clip_mode: str = "two-pass"
    clip_value: float | None = None
    loss_scale: str | float | None = None
    stochastic_rounding: bool = False

    def check(self, optimizer: str) -> None:
        fused = optimizer_class(optimizer) is None  # raises for unknown names
        if self.clip_mode not in CLIP_MODES:
            raise CollieError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got "
                              f"{self.clip_mode!r}")
        if self.loss_scale is not None and self.loss_scale != "dynamic" and not (
                isinstance(self.loss_scale, (int, float)) and self.loss_scale > 0):
            raise CollieError(f"loss_scale must be 'dynamic' or a positive number, got "
                              f"{self.loss_scale!r}")
        if fused:
            return
        extras = [k for k, v in (("clip_value", self.clip_value),
                                 ("loss_scale", self.loss_scale),
                                 ("stochastic_rounding", self.stochastic_rounding)) if v]
        if extras or self.clip_mode != "two-pass":
            raise CollieError(f"{', '.join(extras) or 'clip_mode'} applies to the fused "
                              f"optimizers (lomo, adalomo), not {optimizer!r}")

    def scaler(self) -> LossScaler | None:
        if self.loss_scale is None:
            return None
        if self.loss_scale == "dynamic":
            return LossScaler()
        # a fixed scale: an overflow still skips the step, the scale stays
        return LossScaler(scale=float(self.loss_scale), growth_interval=2**62, backoff=1.0)


def lora_config(config: object | None, rank: int | None, alpha: float | None,
                targets: list[str] | None, dropout: float) -> object | None:
    """A ``peft.LoraConfig`` from ``parallelize``'s LoRA arguments (None: no LoRA)."""
    if config is not None:
        if rank is not None or targets is not None:
            raise CollieError("give LoRA either as lora=LoraConfig(...) or as lora_rank=/"
                              "lora_targets=, not both")
        return config
    if rank is None:
        if targets is not None or alpha is not None:
            raise CollieError("lora_targets or lora_alpha without lora_rank trains nothing "
                              "as LoRA; give the adapters' rank too (e.g. lora_rank=8)")
        return None
    if rank < 1:
        raise CollieError(f"{named('lora_rank')} must be a positive integer, got {rank}")
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                      target_modules=targets or list(DEFAULT_LORA_TARGETS),
                      lora_dropout=dropout)


def lora_plan_args(config: object | None) -> tuple[int | None, str | list[str] | None]:
    """(rank, targets) of a ``peft.LoraConfig`` as the planner prices them."""
    if config is None:
        return None, None
    return config.r, canonical_lora_targets(config.target_modules)


ADAPTER_PREFIX = "base_model.model."


def read_adapter(directory: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(LoraConfig, adapter tensors by our names) of a saved PEFT adapter."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        config = LoraConfig.from_pretrained(str(d))
        tensors = load_file(str(d / "adapter_model.safetensors"))
    except Exception as e:  # peft and safetensors raise many types for bad files
        raise CollieError(f"cannot read a PEFT LoRA adapter from {d}: {e}; give the directory "
                          "PeftModel.save_pretrained wrote") from None
    return config, {k.removeprefix(ADAPTER_PREFIX): v for k, v in tensors.items()}


def model_dtype(model: torch.nn.Module, asked: str | None) -> str:
    """The dtype name of ``model``'s weights; ``asked``, if given, must be it (the plan
    prices the dtype the weights really have)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    have = dtype_name(first.dtype) if first is not None else None
    if asked is None:
        return have or "fp32"
    cast = torch_dtype(asked)
    if have is not None and asked.lower() != have:
        raise CollieError(f"dtype={asked!r} but the model's weights are {have}: pass "
                          f"dtype={have!r} (or leave it out), or cast the model first "
                          f"(model.to({cast}))")
    return asked.lower()


def _resolve_plan(plan: str | Plan | Path, cfg: object, name: str, world: int,
                  gpu: str | None,
                  optimizer: str | None, dtype: str, seq_len: int | None,
                  global_batch_size: int | None, pins: dict, lora: object | None,
                  memory_reserve: float | None = None, refusal: str | None = None) -> Plan:
    from collie_compile.planner.search import plan as solve

    lora_rank, lora_targets = lora_plan_args(lora)
    if isinstance(plan, Plan):
        p = plan
    elif str(plan).lower() == "auto":
        p = solve(cfg, gpus=world, gpu=gpu or local_gpu(),
                  gpus_per_node=cdist.local_world_size(),
                  seq_len=seq_len,
                  global_batch_size=global_batch_size, optimizer=optimizer or "adamw",
                  dtype=dtype, lora_rank=lora_rank,
                  lora_targets=lora_targets, tp_refusal=refusal,
                  **({} if memory_reserve is None else {"memory_reserve": memory_reserve}),
                  **pins)
        if not p.feasible:
            raise CollieError(f"no plan fits {world} x {p.gpu}: the closest is "
                              f"{p.shortfall_bytes / 2**30:.1f} GiB over; "
                              f"{'; '.join(p.suggestions) or 'use more GPUs'}")
        if gpu is None and p.gpu not in CATALOG:
            p.notes.append(f"{p.gpu} is not in the GPU catalog: planned with a100-80gb's "
                           "rates and the memory torch reports; for its own, run "
                           "`collie-compile calibrate --out SPEC.json` on it and pass "
                           "gpu='SPEC.json' (train --gpu SPEC.json)")
    else:
        p = Plan.load(plan)
    if p.model != name:
        raise CollieError(f"the plan is for model {p.model!r} but this model is {name!r}; "
                          "plan this model (collie-compile plan) or pass plan='auto'")
    if str(plan).lower() != "auto":
        if memory_reserve is not None:  # it would be ignored: the plan's memory is priced
            raise CollieError(f"memory_reserve applies to plan='auto'; this plan was priced "
                              f"with {p.usable_memory_bytes / 2**30:.2f} GiB usable per GPU. "
                              "Re-plan with yours: collie-compile plan ... --memory-reserve "
                              f"{memory_reserve}")
        _check_given_plan(p, optimizer, dtype, seq_len, global_batch_size, pins)
        _check_plan_lora(p, lora_rank, lora_targets)
    c = p.chosen
    layers = int(cfg.num_hidden_layers)
    if c is None or len(c.recompute) != layers:
        raise CollieError(f"the plan's layer count does not match {name}'s {layers} layers")
    if c.dp * c.tp * c.pp != world:
        raise CollieError(f"the plan is for {c.dp * c.tp * c.pp} GPUs (dp={c.dp} tp={c.tp} "
                          f"pp={c.pp}) but this job has {world} processes")
    heads, kv, _ = head_layout(cfg)
    check_heads(name, heads, kv, c.tp)
    local = cdist.local_world_size()
    if c.tp > local or local % c.tp:  # tp groups are consecutive ranks: keep them on a node
        raise CollieError(f"the plan's tp={c.tp} would span nodes of {local} processes; "
                          f"re-plan with --gpus-per-node {local}")
    return p


def _check_given_plan(p: Plan, optimizer: str | None, dtype: str, seq_len: int | None,
                      global_batch_size: int | None, pins: dict) -> None:
    """A plan is priced for one optimizer, dtype and shape: run it as priced, or say which
    argument disagrees (silently overriding either would void the memory estimate)."""
    if not p.feasible or p.chosen is None:
        raise CollieError("the plan does not fit its GPUs (it was saved as the closest "
                          "infeasible plan); re-plan with its suggestions: "
                          f"{'; '.join(p.suggestions) or 'more GPUs'}")
    c = p.chosen
    planned = dict(optimizer=p.optimizer, dtype=p.dtype, seq_len=p.seq_len,
                   global_batch_size=p.global_batch_size, dp=c.dp, tp=c.tp, pp=c.pp,
                   zero=c.zero, micro_batch_size=c.micro_batch_size, schedule=c.schedule,
                   recompute=c.recompute[0] if len(set(c.recompute)) == 1 else "mixed")
    asked = dict(optimizer=optimizer and optimizer.lower(), dtype=dtype, seq_len=seq_len,
                 global_batch_size=global_batch_size, **pins)
    differ = [k for k in planned if asked.get(k) is not None and asked[k] != planned[k]]
    if differ:
        raise CollieError(
            "the plan was priced for other settings than asked: "
            + ", ".join(f"{k}={asked[k]!r} (plan: {planned[k]!r})" for k in differ)
            + "; pass the plan's values to run it as priced, or re-plan with yours: "
            + "collie-compile plan ... " + " ".join(f"{flag(k)} {asked[k]}" for k in differ))


def _check_plan_lora(p: Plan, rank: int | None, targets: str | list[str] | None) -> None:
    """A plan priced for LoRA underestimates full training's memory, and one priced for
    full training gives up what LoRA saves: the run must train what the plan priced."""
    norm = canonical_lora_targets
    if p.lora_rank == rank and (rank is None or norm(p.lora_targets) == norm(targets)):
        return

    def what(r: int | None, t: str | list[str] | None) -> str:
        return "full training" if r is None else f"LoRA rank {r} on {norm(t)}"

    raise CollieError(f"the plan was priced for {what(p.lora_rank, p.lora_targets)} but this "
                      f"run asks for {what(rank, targets)}; run it with "
                      f"{lora_flags(p.lora_rank, p.lora_targets)} (parallelize: lora_rank=, "
                      f"lora_targets=), or re-plan: collie-compile plan ... "
                      f"{lora_flags(rank, targets)}")


FACTORED = {"row": 0, "col": 1}  # AdaLomo's statistics: which dim of the weight each spans


def _dim_box(box: ckpt.Box, dim: int) -> ckpt.Box:
    """The 1-D box of a statistic along ``dim`` of a weight in ``box``."""
    return ckpt.Box((box.offset[dim],), (box.shape[dim],), (box.global_shape[dim],))


class ParallelModel:
    """The per-rank program: ``train_step`` over the global batch, ``forward`` for logits,
    and checkpointing (see :mod:`collie_compile.runtime.state`)."""

    def __init__(self, model: torch.nn.Module, plan: Plan, optimizer: str,
                 lr: float | None, optimizer_kwargs: dict,
                 weights: str | Path | None = None, lora: object | None = None,
                 lora_init: dict | None = None, fused: FusedOptions | None = None) -> None:
        self.plan, self.config = plan, model.config
        self.lora, self.lora_init = lora, lora_init
        self.options = fused or FusedOptions()
        self.max_grad_norm, self.last_grad_norm = self.options.max_grad_norm, None
        c = self.chosen = plan.chosen
        self.mesh = cdist.build_mesh(c.pp, c.dp, c.tp)
        self.coords = Coordinates(*(self.mesh.get_local_rank(d) for d in ("pp", "dp", "tp")))
        self.micro_batch, self.seq = c.micro_batch_size, plan.seq_len
        self.num_microbatches = c.num_microbatches
        self.global_batch = plan.global_batch_size
        self.device = cdist.device()
        self.fused_rule = optimizer.lower() if optimizer_class(optimizer) is None else None
        self.tied = tied_names(model)  # alias -> the name checkpoints store
        from transformers.pytorch_utils import Conv1D

        # weights stored [in, out] (GPT-2's Conv1D): a merged adapter goes in transposed
        self.fan_in_fan_out = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
        self.stages, self.stage_ids, self.prefix = self._build(model, weights)
        # Persistent buffers a checkpoint holds beside the weights (an activation's eps,
        # a frozen table): training leaves them alone, saving writes them back.
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.state_dict().items()
                        if n not in params and not b.is_meta}
        self.fused: FusedBackward | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if self.fused_rule:
            cdist.agree(self._refuse_split_ties)
            self.fused = self._make_fused(lr, optimizer_kwargs)
        else:
            self.optimizer = self._make_optimizer(optimizer, lr, optimizer_kwargs)
        self.schedule = self._make_schedule() if c.pp > 1 else None
        self.step_count = 0

    # -- building -------------------------------------------------------------------

    def _build(self, model: torch.nn.Module, weights: str | Path | None
               ) -> tuple[list[fx.GraphModule], list[int], str]:
        c = self.chosen
        model.train()
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and weights is None:
            raise CollieError("the model is on the meta device; pass weights=DIR (a Hugging "
                              "Face safetensors checkpoint) to load its weights")
        if on_meta:
            cdist.agree(lambda: _materialize_buffers(model))
        ids = torch.zeros(self.micro_batch, self.seq, dtype=torch.long,
                          device="meta" if on_meta else "cpu")
        ep = cdist.agree(lambda: capture_static(model, ids))
        ag = annotate(ep, model)
        gm = ag.gm
        _drop_guards(gm)
        layout = tp_layout(ag, self.config, c.tp, bool(self.tied))
        gm = cdist.agree(lambda: tensor_parallel(
            gm, layout, self.mesh.get_group("tp"), self.coords.tp, c.tp,
            *head_layout(self.config)))
        if self.lora is not None:
            adapter = self.lora_init
            gm = cdist.agree(lambda: lora_pass(gm, self.lora, c.tp, adapter,
                                                   tp_rank=self.coords.tp))
        self.tp_shards = dict(gm.meta["tp_shards"])
        self.vocab_slice = gm.meta.get("vocab_slice")
        partial = dict(gm.meta["partial_grads"])
        sets = sorted({tuple(s) for v in partial.values() for s in v})
        groups = cdist.subgroups(self.mesh, [list(s) for s in sets]) if sets else {}
        self.partial_grads = {k: next(groups[tuple(s)] for s in v if tuple(s) in groups)
                              for k, v in partial.items()}
        gm = outline_blocks(gm, ag.block_prefix)
        chunks = c.chunks()
        parts = pipeline_split(gm, ag.block_prefix, chunks)
        mine = [k for k in range(len(parts)) if k % c.pp == self.coords.pp]
        # Every rank knows every parameter's full shape and owning pp rank (for gathers).
        every = list(ag.gm.named_parameters(remove_duplicate=False))
        self.param_dtypes = {n: p.dtype for n, p in every}
        self.param_shapes = {n: self._full_shape(n, p.shape) for n, p in every}
        self.stage_inputs = [[(tuple(n.meta["val"].shape), n.meta["val"].dtype)
                              for n in part.graph.nodes if n.op == "placeholder"]
                             for part in parts]
        self.owner = {n: k % c.pp for k, part in enumerate(parts)
                      for n, _ in part.named_parameters()}
        # A tied weight (input and output embedding) used on several pipeline stages is
        # a copy on each: their gradients are summed over those stages (Megatron's
        # embedding group), and the copy on the lowest stage counts as the weight.
        holders: dict[str, set[int]] = {}
        for k, part in enumerate(parts):
            for n, _ in part.named_parameters():
                holders.setdefault(self.tied.get(n, n), set()).add(k % c.pp)
        self.tied_stages = {n: sorted(holders[self.tied.get(n, n)]) for n in self.owner
                            if len(holders[self.tied.get(n, n)]) > 1}
        sets = sorted({tuple(v) for v in self.tied_stages.values()})
        groups = cdist.subgroups(self.mesh, [list(v) for v in sets], "pp") if sets else {}
        self.tied_groups = {n: groups[tuple(v)] for n, v in self.tied_stages.items()
                            if tuple(v) in groups}
        stages = []
        dp_mesh = self.mesh["dp"] if c.dp > 1 else None
        pieces = cdist.agree(lambda: ckpt.hf_pieces(Path(weights))) if weights else None
        dtype = next(iter(ag.gm.parameters())).dtype
        for k in mine:
            st = move_to_device(parts[k], self.device)
            if not fused_gqa(self.device, dtype):
                st = expand_grouped_kv(st)
            if pieces is not None:  # read just this rank's slices
                cdist.agree(lambda st=st: self._load_weights(st, pieces, weights))
            st = recompute_pass(st.to(self.device), ag.block_prefix, c.layer_modes())
            # ZeRO-1 shards optimizer states; a fused rule has none worth sharding.
            zero = 0 if c.zero == 1 and self.fused_rule else c.zero
            st = data_parallel(st, dp_mesh, zero, ag.block_prefix)
            stages.append(st)
        return stages, mine, ag.block_prefix

    def _full_shape(self, name: str, local: torch.Size) -> tuple[int, ...]:
        shape, shard = list(local), self.tp_shards.get(name)
        if shard is not None:
            shape[shard.dim] = shard.size
        return tuple(shape)

    def _boxes(self, name: str, p: torch.Tensor) -> list[tuple[ckpt.Box, tuple]]:
        """The checkpoint boxes of this rank's ``p``, each with its index in the local
        tensor."""
        return ckpt.local_boxes(p, self.tp_shards.get(name), self.coords.tp,
                                self.param_shapes[name])

    def _cut(self, name: str, p: torch.Tensor, v: torch.Tensor, dim: int | None = None
             ) -> list[tuple[torch.Tensor, ckpt.Box]]:
        """``v`` (``p`` or a state of it; with ``dim``, a 1-D statistic along that dim of
        the weight) cut into ``p``'s boxes, each box once."""
        out, seen = [], set()
        for box, idx in self._boxes(name, p):
            if dim is not None:
                box, idx = _dim_box(box, dim), (idx[dim],)
            if box not in seen:
                seen.add(box)
                out.append((ckpt.local_tensor(v)[idx], box))
        return out

    def _read(self, name: str, p: torch.Tensor, stored: list, what: str,
              dim: int | None = None) -> torch.Tensor:
        """This rank's part of ``p`` (with ``dim``, of a 1-D statistic along that dim)
        from a checkpoint's pieces."""
        boxes, shape = self._boxes(name, p), tuple(ckpt.local_tensor(p).shape)
        if dim is not None:
            boxes, shape = [(_dim_box(b, dim), (i[dim],)) for b, i in boxes], (shape[dim],)
        return ckpt.read_local(stored, boxes, shape, what)

    def _load_weights(self, stage: fx.GraphModule, pieces: dict, source: object) -> None:
        for name, p in list(stage.named_parameters()):
            key = self._stored_name(name, pieces)
            if key is None:
                raise CollieError(f"{source} has no weight {name!r}; is it a checkpoint of "
                                  f"{self.plan.model}?")
            owner, _, leaf = name.rpartition(".")
            value = self._read(name, p, pieces[key], key).to(p.dtype)
            setattr(stage.get_submodule(owner), leaf,
                    torch.nn.Parameter(value, requires_grad=p.requires_grad))

    def _make_optimizer(self, name: str, lr: float | None, kwargs: dict
                        ) -> torch.optim.Optimizer:
        params = [p for st in self.stages for p in st.parameters() if p.requires_grad]
        name = name.lower()
        cls = optimizer_class(name, params[0].dtype)
        opts = optimizer_options(name, lr, kwargs)
        if self.chosen.zero == 1 and self.chosen.dp > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(params, optimizer_class=cls,
                                           process_group=self.mesh.get_group("dp"), **opts)
        return cls(params, **opts)

    def _refuse_split_ties(self) -> None:
        """A weight updated inside backward cannot wait for its tied copy's gradient on
        another pipeline stage."""
        if self.fused_rule and self.tied_stages:
            raise CollieError(f"{self.fused_rule} updates each weight inside backward, but "
                              f"{min(self.tied_stages)} is tied across pipeline stages "
                              "(embedding and LM head), whose copies must first sum their "
                              "gradients; use pp=1, or an optimizer that steps after backward "
                              "(adamw, lion, ...)")

    def _make_fused(self, lr: float | None, kwargs: dict) -> FusedBackward:
        """LOMO/AdaLomo inside backward: after each gradient's dp reduction (the stage's
        GradReducer, or FSDP2's reduce-scatter hooks), with sharded statistics summed
        over the ranks holding the other slices."""
        unknown = set(kwargs) - {"weight_decay"}
        if unknown:
            raise CollieError(f"{self.fused_rule} takes weight_decay in optimizer_kwargs, not "
                              f"{', '.join(sorted(unknown))}")
        params = {n: p for n, p in self.local_parameters().items() if p.requires_grad}
        o = self.options
        engine = FusedBackward(
            params.items(), self.fused_rule, lr if lr is not None else DEFAULT_LR[self.fused_rule],
            kwargs.get("weight_decay", 0.0), max_grad_norm=o.max_grad_norm,
            clip_mode=o.clip_mode, clip_value=o.clip_value, loss_scaler=o.scaler(),
            stochastic_rounding=o.stochastic_rounding,
            allsum_for=lambda n: self._allsum_for(n, params[n]),
            partial_group=self.partial_grads.get,
            # One seed everywhere: replicas of a parameter (dp under ZeRO-0, tp peers of a
            # replicated norm) must round it the same way or they drift apart.
            counts_in_norm=lambda n: self._writes(n, params[n]), seed=0)
        fsdp = False
        for st in self.stages:
            reducer = st.meta.get("grad_reducer")
            if reducer is not None:
                reducer.on_ready = engine.on_final
            else:
                engine.attach([p for p in st.parameters() if p.requires_grad])
                fsdp = fsdp or hasattr(st, "set_requires_gradient_sync")
        # Under torch.distributed.pipelining an FSDP2 stage syncs gradients once, after
        # the last micro-batch, and runs the hooks then; otherwise FSDP2 reduce-scatters
        # every micro-batch (gradients stay sharded, as the memory model counts them) and
        # runs them each time, as plain autograd does.
        pipelined = self.chosen.pp > 1
        engine.accumulations = 1 if fsdp and pipelined else self.num_microbatches
        return engine

    def _allsum_for(self, name: str, p: torch.Tensor) -> object | None:
        """Sum over the ranks holding the other slices of ``name``: tp (its shard dim)
        and, under FSDP2, dp (dim 0). None for a parameter this rank holds whole."""
        splits = []
        shard = self.tp_shards.get(name)
        if shard is not None:
            splits.append((shard.dim, self.mesh.get_group("tp")))
        for placement in getattr(p, "placements", ()):
            if placement.is_shard():
                splits.append((placement.dim, self.mesh.get_group("dp")))
        if not splits:
            return None

        def allsum(t: torch.Tensor, dims: tuple[int, ...]) -> None:
            for dim, group in splits:
                if dim in dims:
                    dist.all_reduce(t, group=group)
        return allsum

    def _make_schedule(self) -> object:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        c = self.chosen
        n = c.pp * c.virtual_stages
        group = self.mesh.get_group("pp")
        pstages = [PipelineStage(st, k, n, self.device, group=group)
                   for st, k in zip(self.stages, self.stage_ids, strict=True)]
        self._loss_scale = 1.0
        loss_fn = self._pipeline_loss
        if c.schedule == "interleaved":
            return ScheduleInterleaved1F1B(pstages, c.num_microbatches, loss_fn=loss_fn,
                                           scale_grads=False)
        cls = ScheduleGPipe if c.schedule == "gpipe" else Schedule1F1B
        return cls(pstages[0], c.num_microbatches, loss_fn=loss_fn, scale_grads=False)

    # -- training ---------------------------------------------------------------------

    def _pipeline_loss(self, out: object, target: torch.Tensor) -> torch.Tensor:
        return self._token_loss(out, target) * self._loss_scale

    def _token_loss(self, out: object, target: torch.Tensor) -> torch.Tensor:
        if self.vocab_slice is None:
            return token_loss(out, target)
        return vocab_parallel_cross_entropy(_first(out), target, self.vocab_slice[0],
                                            self.mesh.get_group("tp"), IGNORE_INDEX)

    def _local_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch.get("labels", ids)).clone()
        mask = batch.get("attention_mask")
        if ids.dim() != 2 or tuple(ids.shape) != (self.global_batch, self.seq):
            raise CollieError(f"input_ids must be [global_batch, seq] = "
                              f"[{self.global_batch}, {self.seq}] as planned, got "
                              f"{list(ids.shape)}")
        vocab = int(self.config.vocab_size)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise CollieError(f"input_ids hold token id {bad}, outside the model's vocabulary "
                              f"of {vocab}; tokenize with the model's own tokenizer")
        if mask is not None:
            mask = torch.as_tensor(mask).bool()
            # Right padding under a causal mask changes no real token: only its labels go.
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise CollieError("attention_mask has padding before real tokens (left "
                                  "padding); pad on the right or pack sequences")
            labels[~mask] = IGNORE_INDEX
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        tokens = int((targets != IGNORE_INDEX).sum())
        share = self.global_batch // self.chosen.dp
        rows = slice(self.coords.dp * share, (self.coords.dp + 1) * share)
        return ids[rows].to(self.device), targets[rows].to(self.device), tokens

    def train_step(self, batch: dict) -> float:
        """Forward, backward and one optimizer step over the global batch; returns its mean
        token loss (the same on every rank)."""
        ids, targets, tokens = self._local_batch(batch)
        if self.fused is not None:  # updates happen inside backward
            total = self.fused.step(lambda: self._forward_backward(
                ids, targets, tokens, self.fused.loss_scale))
            self.last_grad_norm = self.fused.last_grad_norm
        else:
            # Gradients of the previous step stay readable until here (full_state_dict).
            self.optimizer.zero_grad(set_to_none=True)
            total = self._forward_backward(ids, targets, tokens)
            self._sum_partial_grads()
            self._sum_tied_grads()
            if self.max_grad_norm is not None:
                self.last_grad_norm = self.clip_grad_norm(self.max_grad_norm)
            self.optimizer.step()
        self.step_count += 1
        return self._global_loss(total)

    def _forward_backward(self, ids: torch.Tensor, targets: torch.Tensor, tokens: int,
                          loss_scale: float = 1.0) -> torch.Tensor:
        """Every micro-batch forward and backward (gradients summed and reduced over dp);
        returns this rank's share of the unscaled loss."""
        scale = loss_scale / max(tokens, 1)
        for st in self.stages:
            if "grad_reducer" in st.meta:
                st.meta["grad_reducer"].accumulations = self.num_microbatches
        total = torch.zeros((), dtype=torch.float32)
        if self.schedule is None:
            st = self.stages[0]
            for x, y in zip(ids.chunk(self.num_microbatches),
                            targets.chunk(self.num_microbatches), strict=True):
                loss = self._token_loss(st(x), y) * scale
                loss.backward()
                total += loss.detach().float().cpu()
        else:
            self._loss_scale = scale
            losses: list[torch.Tensor] = []
            first, last = 0 in self.stage_ids, self._is_last()
            args = (ids,) if first else ()
            kwargs = {"target": targets, "losses": losses} if last else {}
            # the losses come through the loss function: keeping every micro-batch's
            # logits for a merged return would hold m x [b, s, V] on the last stage
            self.schedule.step(*args, return_outputs=False, **kwargs)
            total += sum((x.detach().float().cpu() for x in losses), torch.zeros(()))
        for st in self.stages:
            if "grad_reducer" in st.meta:
                st.meta["grad_reducer"].finish()
        return total / loss_scale

    def _is_last(self) -> bool:
        return self.chosen.pp * self.chosen.virtual_stages - 1 in self.stage_ids

    def _sum_partial_grads(self) -> None:
        """Tensor-parallel peers that each hold a partial gradient (GQA-shared KV heads,
        LoRA's replicated factor) add them up."""
        for st in self.stages:
            for name, p in st.named_parameters():
                group = self.partial_grads.get(name)
                if group is not None and p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    dist.all_reduce(g, group=group)

    def _sum_tied_grads(self) -> None:
        """Copies of a tied weight on several pipeline stages add up their gradients, so
        every copy takes the step the one weight would."""
        for st in self.stages:
            for name, p in st.named_parameters():
                group = self.tied_groups.get(name)
                if group is not None and p.grad is not None:
                    dist.all_reduce(ckpt.local_tensor(p.grad), group=group)

    def _stored_name(self, name: str, stored: dict) -> str | None:
        """``name``, or the name a tied weight is stored under in ``stored``."""
        if name in stored:
            return name
        canonical = self.tied.get(name)
        return next((k for k in stored if canonical is not None
                     and self.tied.get(k) == canonical), None)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)), as
        ``torch.nn.utils.clip_grad_norm_`` does, with ‖g‖ the norm of the whole model's
        gradient: each box counted once over tp, dp and pp. Returns ‖g‖."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        local = self.local_parameters()
        for name, p in local.items():
            if p.grad is not None and self._writes(name, p):
                total += ckpt.local_tensor(p.grad).double().pow(2).sum()
        dist.all_reduce(total)
        norm = float(total.sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p in local.values():
            if p.grad is not None:
                ckpt.local_tensor(p.grad).mul_(coef)
        return norm

    def _global_loss(self, total: torch.Tensor) -> float:
        """Sum of every dp rank's share on the last stage, given to every rank."""
        if not self._is_last():
            total = torch.zeros(())
        elif self.coords.tp != 0:
            total = torch.zeros(())  # tp peers hold the same value: count it once
        total = total.to(self.device)
        dist.all_reduce(total)
        return float(total)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids`` of the planned shape [global_batch, seq], gathered on
        every rank."""
        ids = torch.as_tensor(input_ids)
        if tuple(ids.shape) != (self.global_batch, self.seq):
            raise CollieError(f"forward takes the planned shape [{self.global_batch}, "
                              f"{self.seq}], got {list(ids.shape)}")
        share = self.global_batch // self.chosen.dp
        mine = ids[self.coords.dp * share:(self.coords.dp + 1) * share].to(self.device)
        vocab = int(self.config.vocab_size)
        local = torch.zeros(share, self.seq, vocab, device=self.device)
        for i, x in enumerate(mine.split(self.micro_batch)):
            out = self._forward_micro_batch(x)
            rows = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            if out is not None and self.vocab_slice is not None:  # each tp rank its slice
                local[rows, :, self.vocab_slice[0]:self.vocab_slice[1]] = out
            elif out is not None and self.coords.tp == 0:
                local[rows] = out
        full = torch.zeros(self.global_batch, self.seq, vocab, device=self.device)
        full[self.coords.dp * share:(self.coords.dp + 1) * share] = local
        dist.all_reduce(full)
        return full.cpu()

    def _forward_micro_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run one micro-batch through the stages in order, passing boundary tensors
        point to point along the pp group; the logits on the last stage's ranks."""
        n = self.chosen.pp * self.chosen.virtual_stages
        dp, tp = self.coords.dp, self.coords.tp
        peer = [int(self.mesh.mesh[j, dp, tp]) for j in range(self.chosen.pp)]
        acts: tuple = (x,)
        for k in range(n):
            here, prev = k % self.chosen.pp, (k - 1) % self.chosen.pp
            if here != self.coords.pp:
                if prev == self.coords.pp and k > 0:
                    for t in acts:
                        dist.send(t.contiguous(), dst=peer[here])
                continue
            if k > 0 and prev != here:
                acts = tuple(torch.empty(shape, dtype=dtype, device=self.device)
                             for shape, dtype in self.stage_inputs[k])
                for t in acts:
                    dist.recv(t, src=peer[prev])
            out = self.stages[self.stage_ids.index(k)](*acts)
            acts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return acts[0] if self._is_last() else None

    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF name -> this rank's parameter (a tp slice; a DTensor under ZeRO 2/3)."""
        return {n: p for st in self.stages for n, p in st.named_parameters()}

    def full_state_dict(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient) whole, on every rank, under its HF name:
        gathered over dp (ZeRO 2/3), tp (slices) and pp (stages); copies, which later
        steps leave alone. A collective."""
        local = self.local_parameters()
        whole: dict[str, torch.Tensor] = {}
        for name in sorted(local):  # same order on all ranks of this pp stage
            p = local[name]
            t = p.grad if grads else p.detach()
            if t is None:
                t = torch.zeros_like(p.detach())
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            whole[name] = self._gather_tp(name, t)
        out = {}
        for name in sorted(self.owner):
            src = int(self.mesh.mesh[self.owner[name], 0, 0])
            buf = (whole[name].contiguous() if name in whole
                   else torch.empty(self.param_shapes[name], dtype=self.param_dtypes[name],
                                 device=self.device))
            dist.broadcast(buf, src=src)
            # a snapshot: a local whole tensor on the CPU would alias the live weight or
            # gradient (a view of a flat bucket buffer), which the next step changes
            out[name] = buf.to("cpu", copy=name in whole)
        for alias in self.tied:  # a tied weight under all its names
            if alias not in out:
                have = self._stored_name(alias, out)
                if have is not None:
                    out[alias] = out[have]
        return out

    # -- checkpoints --------------------------------------------------------------------

    @staticmethod
    def check_save_path(directory: str | Path) -> None:
        """Raise on every rank if rank 0, the writer, may not save to ``directory``: a
        file, or a folder with files of the user's in it. A collective."""
        cdist.agree(lambda: ckpt.check_replaceable(Path(directory))
                    if dist.get_rank() == 0 else None)

    def save_pretrained(self, directory: str | Path, merge: bool = False) -> None:
        """Write a plain Hugging Face checkpoint (config.json + model.safetensors) that
        ``AutoModelForCausalLM.from_pretrained`` loads; with LoRA, a PEFT adapter
        (adapter_config.json + adapter_model.safetensors) for ``PeftModel.from_pretrained``
        unless ``merge`` folds the adapters into the weights. A collective; rank 0 writes."""
        from safetensors.torch import save_file

        final = Path(directory)
        self.check_save_path(final)
        weights = self.full_state_dict()
        if dist.get_rank() == 0:
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            adapters = {k: v for k, v in weights.items() if ".lora_" in k}
            if adapters and not merge:
                save_file({ADAPTER_PREFIX + k: v.contiguous() for k, v in adapters.items()},
                          str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
                self.lora.save_pretrained(str(tmp))
            else:
                weights = _merged(weights, self.lora, self.fan_in_fan_out)
                # a tied weight once, under the name HF stores (it re-ties on load)
                weights = {k: v for k, v in weights.items() if self.tied.get(k, k) == k}
                weights.update({k: v for k, v in self.buffers.items() if k not in weights})
                save_file({k: v.contiguous() for k, v in weights.items()},
                          str(tmp / "model.safetensors"), metadata={"format": "pt"})
                self.config.save_pretrained(tmp)
            ckpt.replace_dir(tmp, final)
        dist.barrier()

    def save_checkpoint(self, directory: str | Path) -> None:
        """Write the training state (weights, optimizer states, step) sharded: each rank
        saves the boxes it alone holds. Resumable under another plan or GPU count."""
        final = Path(directory)
        self.check_save_path(final)
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        tensors, scalars = {}, {}
        states = self._optimizer_states()
        for name, p in self.local_parameters().items():
            if not self._writes(name, p):
                continue
            tensors[name] = self._cut(name, p, p.detach())
            for key, v in states.get(name, {}).items():
                if not torch.is_tensor(v) or v.dim() == 0:
                    scalars[key] = float(v)
                elif key in FACTORED:  # AdaLomo's row/column statistics
                    dim = FACTORED[key]
                    # FSDP splits rows only: every dp rank holds the same column statistics
                    if dim == 0 or not hasattr(p, "to_local") or self.coords.dp == 0:
                        tensors[f"{name}/{key}"] = self._cut(name, p, v, dim)
                elif v.shape == p.shape:
                    tensors[f"{name}/{key}"] = self._cut(name, p, v)
        if not self._writes_states():  # ZeRO-1: states live on their owner only
            tensors = {k: v for k, v in tensors.items() if "/" not in k}
            tensors.update({f"{n}/{k}": self._cut(n, p, v)
                            for n, p in self.local_parameters().items() if self._tp_first(n)
                            for k, v in states.get(n, {}).items()
                            if torch.is_tensor(v) and v.shape == p.shape})
        entries = ckpt.write_rank_file(tmp / f"rank{dist.get_rank():05d}.safetensors", tensors)
        every = cdist.all_strings(json.dumps({"tensors": entries, "scalars": scalars}))
        if dist.get_rank() == 0:
            index: dict = {"format": ckpt.FORMAT, "version": ckpt.VERSION,
                           "model": self.plan.model, "step": self.step_count,
                           "optimizer": self.fused_rule or type(self._inner_optimizer()).__name__,
                           "scalars": {}, "tensors": {}}
            for text in every:
                part = json.loads(text)
                index["scalars"].update(part["scalars"])
                for k, e in part["tensors"].items():
                    index["tensors"].setdefault(k, []).extend(e)
            (tmp / "index.json").write_text(json.dumps(index, indent=1))
            ckpt.replace_dir(tmp, final)
        dist.barrier()

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore weights, optimizer states and step from :meth:`save_checkpoint`'s
        directory, whatever plan wrote it; each rank reads only what it holds."""
        def read() -> tuple[dict, dict]:
            meta, pieces = ckpt.read_index(Path(directory))
            if meta.get("model") != self.plan.model:
                raise CollieError(f"{directory} holds model {meta.get('model')!r}, not "
                                  f"{self.plan.model!r}")
            return meta, pieces

        meta, pieces = cdist.agree(read)

        def load() -> None:
            for name, p in self.local_parameters().items():
                stored = self._stored_name(name, pieces)
                if stored is None:
                    raise CollieError(f"{directory} has no tensor {name!r}")
                with torch.no_grad():
                    ckpt.local_tensor(p).copy_(self._read(name, p, pieces[stored], name))
                if p.requires_grad:
                    self._restore_state(name, p, pieces, meta["scalars"])

        cdist.agree(load)
        self.step_count = int(meta["step"])
        if self.fused is not None:
            self.fused.step_count = self.step_count
        dist.barrier()

    def _restore_state(self, name: str, p: torch.Tensor, pieces: dict, scalars: dict
                       ) -> None:
        """The optimizer state of ``p`` from the checkpoint's boxes of it. For AdaLomo
        the row/column statistics (fresh where a checkpoint of another optimizer has
        none); for LOMO nothing; otherwise every p-shaped state and the scalars."""
        key = self._stored_name(name, pieces) or name  # a tied weight's other name
        stored = {k.split("/", 1)[1]: v for k, v in pieces.items()
                  if k.startswith(key + "/")}
        if self.fused is not None:
            if self.fused_rule == "adalomo":
                state = adalomo_state(ckpt.local_tensor(p.detach()))
                for key, t in state.items():
                    if key in stored and torch.is_tensor(t):
                        t.copy_(self._read(name, p, stored[key], f"{name}/{key}",
                                           FACTORED.get(key)))
                state["step"] = int(scalars.get("step", 0))
                self.fused.state[name] = state
            return
        inner = self._inner_optimizer()
        if not any(p is q for g in inner.param_groups for q in g["params"]):
            return  # ZeRO-1: another rank owns this parameter's state
        state = {}
        for key in sorted(stored):
            value = self._read(name, p, stored[key], f"{name}/{key}")
            # in the dtype saved: fp32 masters and moments of 16-bit weights stay fp32
            t = torch.zeros_like(p.detach(), dtype=value.dtype)
            ckpt.local_tensor(t).copy_(value)
            state[key] = t
        for key, v in scalars.items():
            state[key] = torch.tensor(v, dtype=torch.float32)
        if state:
            inner.state[p] = state

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer

    def _optimizer_states(self) -> dict[str, dict]:
        if self.fused is not None:
            return self.fused.state
        by_id = {id(p): n for n, p in self.local_parameters().items()}
        return {by_id[id(p)]: st for p, st in self._inner_optimizer().state.items()}

    def _writes_states(self) -> bool:
        return self.fused is not None or not (self.chosen.zero == 1 and self.chosen.dp > 1)

    def _tp_first(self, name: str) -> bool:
        """False on a tp rank that holds the same slice as a lower one (GQA KV heads)."""
        shard = self.tp_shards.get(name)
        r = self.coords.tp
        return shard.first(r) if shard is not None else r == 0

    def _writes(self, name: str, p: torch.Tensor) -> bool:
        """Whether this rank saves ``name``: one copy of every box."""
        stages = self.tied_stages.get(name)
        return (self._tp_first(name) and (hasattr(p, "to_local") or self.coords.dp == 0)
                and (stages is None or self.coords.pp == stages[0]))

    def _gather_tp(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shard = self.tp_shards.get(name)
        if shard is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.chosen.tp)]
        dist.all_gather(parts, t.contiguous(), group=self.mesh.get_group("tp"))
        return shard.assemble(parts)


def _drop_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the input-shape guards of a static capture: the rank program runs at the
    captured shape only."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    return gm


def tp_layout(ag: object, cfg: object, tp: int, tied: bool) -> dict[str, str]:
    """How each linear of the blocks splits under tp ("column" in the sharded region,
    else "row"), and the embedding and LM head ("vocab") where the vocabulary splits."""
    layout = {i.name: "column" if i.sharded else "row" for i in ag.nodes.values()
              if i.kind == "linear" and i.block is not None}
    vocab = int(cfg.vocab_size)
    if vocab_parallel(vocab, tied, tp):
        # Vocabulary-parallel embedding and head: the logits stay split over tp.
        for i in ag.nodes.values():
            if i.block is None and (i.kind == "linear" or i.op == "aten.embedding.default") \
                    and any(ag.param_shapes[p][0] == vocab for p in i.params):
                layout[i.name] = "vocab"
    return layout


def head_layout(cfg: object) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of a transformers config (whatever
    the family calls them; multi-query models have one key/value head)."""
    heads, kv = attention_heads(cfg)
    return heads, kv, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


@functools.lru_cache(maxsize=16)
def _loss_refusal(cfg_json: str, name: str) -> str | None:
    from collie_compile.models.probe import probe_config
    from collie_compile.models.registry import build_model, config_from_dict

    try:
        probe = probe_config(config_from_dict(json.loads(cfg_json), name), layers=1,
                             no_dropout=True)
        torch.manual_seed(0)
        model = build_model(probe, device="cpu").eval()
        ids = torch.randint(0, int(probe.vocab_size), (2, 16),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - a probe that does not run says nothing of the loss
        return None
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    ours = float(token_loss(out.logits, targets)) / int((targets != IGNORE_INDEX).sum())
    theirs = float(out.loss)
    if abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)):
        return None
    return (f"{name}: its own loss is not next-token cross-entropy on its logits "
            f"({theirs:.4f} against {ours:.4f} on a probe), which is what collie-compile "
            "trains (as transformers' ForCausalLMLoss: labels shifted by one, -100 "
            "ignored); train it with its own training code")


def loss_refusal(cfg: object) -> str | None:
    """Why the runtime's loss would not be this model's own (CPM-Ant's does not shift the
    labels): both computed on a one-block CPU probe with random weights; None where they
    agree (or the probe cannot run: capture then says why)."""
    return _loss_refusal(cfg.to_json_string(), model_name(cfg))


def tp_refusal(cfg: object) -> str | None:
    """Why tensor parallelism cannot run ``cfg``'s model exactly (fused projections, norms
    over all heads' features, ...), found by running the tensor_parallel pass for tp=2 on
    a two-block probe on the meta device; None if it can. Cached with the profiles."""
    import hashlib

    import transformers

    from collie_compile.capture import annotate as annotate_module
    from collie_compile.cost.profile import cache_dir
    from collie_compile.models.registry import build_model, with_layers
    from collie_compile.passes import tensor_parallel as tp_pass

    # the verdict depends on the config, the libraries and the code that decides it
    code = [Path(m.__file__).read_text() for m in (tp_pass, annotate_module)]
    key = hashlib.sha256("\0".join([
        cfg.to_json_string(), torch.__version__, transformers.__version__,
        Path(__file__).read_text(), *code]).encode()).hexdigest()[:16]
    path = cache_dir() / f"tp-refusal-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["refusal"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: work it out again
    model = build_model(with_layers(cfg, min(2, int(cfg.num_hidden_layers))))
    ag = annotate(capture_static(model, torch.zeros(2, 16, dtype=torch.long,
                                                     device="meta")), model)
    gm = _drop_guards(ag.gm)
    refusal = None
    try:
        tensor_parallel(gm, tp_layout(ag, cfg, 2, bool(tied_names(model))), None, 0, 2,
                        *head_layout(cfg))
    except CollieError as e:
        reason = str(e).removeprefix("tensor_parallel: ").split("; use tp=1")[0]
        refusal = f"tp>1 unsupported for {model_name(cfg)}: {reason}; dp, pp and ZeRO work"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"refusal": refusal}))
    tmp.replace(path)
    return refusal


def _merged(weights: dict[str, torch.Tensor], config: object | None,
            fan_in_fan_out: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Base weights with each adapter folded in (W + scaling·B·A, transposed for the
    modules in ``fan_in_fan_out`` that store W as [in, out]), adapters dropped."""
    out = {k: v for k, v in weights.items() if ".lora_" not in k}
    for a_name in [k for k in weights if k.endswith(".lora_A.weight")]:
        module = a_name.removesuffix(".lora_A.weight")
        r = weights[a_name].shape[0]
        scaling = config.lora_alpha / (r ** 0.5 if config.use_rslora else r)
        b = weights[f"{module}.lora_B.weight"]
        delta = scaling * (b @ weights[a_name])
        out[f"{module}.weight"] = out[f"{module}.weight"] + (
            delta.T if module in fan_in_fan_out else delta)
    return out


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Give a meta-device model real buffers (rotary tables): checkpoints do not hold
    them, so rebuild each owning module from the config on the CPU."""
    for path, mod in model.named_modules():
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=model.config)
        except Exception as e:  # any constructor failure means we cannot rebuild it
            raise CollieError(f"cannot rebuild the buffers of {path} ({type(mod).__name__}) "
                              f"off the meta device: {e}; load the model on the CPU") from None
        for name, buf in fresh.named_buffers(recurse=False):
            mod.register_buffer(name, buf, persistent=name in mod.state_dict())


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def token_loss(out: object, target: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over ``target`` positions that count."""
    logits = _first(out)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
