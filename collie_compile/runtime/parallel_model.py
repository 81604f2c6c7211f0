"""``parallelize``: a plan turned into a trainer on every rank of a torchrun job.

:class:`ParallelModel` is a facade over three parts, each its own module: the rank's
program (:mod:`~collie_compile.runtime.program`: the passes applied for this rank's
coordinates), stepping it (:mod:`~collie_compile.runtime.step`) with its optimizer
(:mod:`~collie_compile.runtime.updates`), and its state in and out
(:mod:`~collie_compile.runtime.saving`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from collie_compile.config import Pins, Request
from collie_compile.errors import CollieError
from collie_compile.models.registry import count_params, load_config, model_name
from collie_compile.passes.lora import is_svd
from collie_compile.planner.result import Plan
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime import saving
from collie_compile.runtime.adalora import ADALORA_FILE, AdaLoraSteps
from collie_compile.runtime.options import (
    FusedOptions,
    lora_config,
    model_dtype,
    read_adapter,
    with_peft_defaults,
)
from collie_compile.runtime.program import RankProgram, build_rank_program, release_weights
from collie_compile.runtime.refusals import loss_refusal, tp_refusal
from collie_compile.runtime.resolve import resolve_plan
from collie_compile.runtime.step import Stepper
from collie_compile.runtime.updates import in_backward, make_updates


def parallelize(model: torch.nn.Module, gpus: int | None = None,
                plan: str | Plan | Path = "auto", optimizer: str | None = None,
                lr: float | None = None, optimizer_kwargs: dict | None = None,
                seq_len: int | None = None, global_batch_size: int | None = None,
                gpu: str | None = None, dtype: str | None = None, dp: int | None = None,
                tp: int | None = None, pp: int | None = None, zero: int | None = None,
                micro_batch_size: int | None = None, schedule: str | None = None,
                recompute: str | None = None, virtual_stages: int | None = None,
                weights: str | Path | None = None,
                lora: object | None = None, lora_rank: int | None = None,
                lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                lora_dropout: float = 0.0, lora_adapter: str | Path | None = None,
                max_grad_norm: float | None = None, clip_mode: str = "two-pass",
                clip_value: float | None = None, loss_scale: str | float | None = None,
                stochastic_rounding: bool = False, memory_reserve: float | None = None,
                update_in_backward: bool | None = None,
                position_ids: bool = False, ep: int | None = None,
                peft: object | None = None) -> ParallelModel:
    """Split ``model`` over the ranks of this torchrun job and return its trainer.

    Call once on every rank with the same arguments. ``global_batch_size`` (sequences per
    step) defaults to 8 a GPU, a fine-tuning run's batch. ``plan`` is ``"auto"`` (solve it
    with the pins given: dp, tp, pp, zero, micro_batch_size, schedule, recompute,
    virtual_stages, ep; see :class:`~collie_compile.config.Pins`), a
    :class:`Plan`, or a plan JSON file from ``collie-compile plan --out``; the optimizer
    defaults to the plan's (adamw for "auto"), the dtype is the model's weights'. An auto
    plan is made for ``gpu`` (a catalog name or spec file; default: the CUDA device this
    runs on, with the memory torch reports, or a100-80gb on a CPU), keeping the fraction
    ``memory_reserve`` (default 0.05) of each GPU's memory free for other processes and
    allocator slack; a plan given keeps the reserve it was priced with. A model too big
    for one device comes on the meta device with ``weights=DIR`` (a Hugging Face
    safetensors checkpoint): each rank reads only the slices it holds. ``parallelize``
    takes the model's weights over: the ones this rank trains are its tensors, the rest
    (other stages', whole tensors tp or ZeRO-3 sliced) are freed, so no rank holds two
    copies; read weights back through the returned object (``full_state_dict``,
    ``save_pretrained``).

    Adapters: ``peft=`` a peft config (``LoraConfig``, with ``use_dora``/``use_rslora``
    too, or ``IA3Config``; others are refused with the reason), ``lora=`` the same, or
    ``lora_rank=, lora_alpha=, lora_targets=`` (``target_modules`` as peft matches them);
    peft's defaults for the model type fill what the config leaves out.
    ``lora_adapter=DIR`` continues a saved PEFT adapter of any of these methods. Only the
    adapters train; ``save_pretrained`` then writes a PEFT adapter.
    ``max_grad_norm`` clips the whole model's gradient norm before each step.

    ``optimizer="lomo"`` or ``"adalomo"`` update each parameter inside backward (see
    :mod:`collie_compile.optim.in_backward`), and so do lion, adamw, adam and adan with
    ``update_in_backward=True`` (None: the plan's choice; the options below imply it):
    ``clip_mode`` ("two-pass" or "stale") says how they clip to ``max_grad_norm``,
    ``clip_value`` clips elementwise, ``loss_scale`` ("dynamic" or a fixed number) scales
    the loss for fp16 and skips a step that overflows, and ``stochastic_rounding`` rounds
    updates into 16-bit weights randomly (then no fp32 master is kept).

    ``position_ids=True``: batches may carry ``position_ids`` that restart within a row
    (documents packed into rows, as transformers' ``DataCollatorWithFlattening`` makes
    them); each document then attends only to itself, as in transformers without a KV
    cache. Without it a row is one sequence and a batch with position_ids is refused.
    """
    Request(gpus=gpus, seq_len=seq_len, global_batch_size=global_batch_size, dtype=dtype,
            memory_reserve=memory_reserve)
    pins = Pins(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch_size=micro_batch_size,
                schedule=schedule, recompute=recompute, virtual_stages=virtual_stages, ep=ep)
    cdist.ensure_initialized()
    world = dist.get_world_size()
    cfg = cdist.agree(lambda: load_config(model.config))  # one stack of blocks, or why not
    name = model_name(cfg)
    dtype = model_dtype(model, dtype)

    fused = FusedOptions(max_grad_norm, clip_mode, clip_value, loss_scale, stochastic_rounding)
    if update_in_backward is None and fused.in_backward_only():
        update_in_backward = True  # options that only an update inside backward applies

    lora_cfg = cdist.agree(lambda: lora_config(lora, lora_rank, lora_alpha, lora_targets,
                                               lora_dropout, peft))
    adapter = cdist.agree(lambda: read_adapter(lora_adapter)) if lora_adapter else None
    if adapter is not None and lora_cfg is None:
        lora_cfg = adapter[0]
    if lora_cfg is not None:
        lora_cfg = cdist.agree(lambda: with_peft_defaults(lora_cfg, model))

    why = cdist.agree(lambda: loss_refusal(cfg))
    if why:
        raise CollieError(why)
    refusal = None
    if str(plan).lower() == "auto" and world > 1 and tp != 1:  # can tp run this model?
        refusal = cdist.broadcast_text(cdist.agree(
            lambda: (tp_refusal(cfg) or "") if dist.get_rank() == 0 else "")) or None

    def resolve() -> Plan:
        if optimizer is not None:
            fused.check(optimizer, update_in_backward)
        if gpus is not None and gpus != world:
            raise CollieError(f"gpus={gpus} but this job has {world} processes; launch "
                              f"torchrun with --nproc-per-node (x nodes) = {gpus}, or pass "
                              f"gpus={world}")
        split = {k: v for k, v in pins.given().items() if k in ("dp", "tp", "pp") and v > 1}
        if world == 1 and split:
            need = math.prod(split.values())
            raise CollieError(f"{' '.join(f'{k}={v}' for k, v in split.items())} needs at "
                              f"least {need} processes and this is one; launch it under "
                              f"torchrun --nproc-per-node {need}")
        p = resolve_plan(plan, cfg, name, world, gpu, optimizer, dtype, seq_len,
                         global_batch_size, pins.given(), lora_cfg, memory_reserve, refusal,
                         update_in_backward, fused, count_params(model))
        fused.check(optimizer or p.optimizer, in_backward(optimizer or p.optimizer, p))
        return p

    # Rank 0's plan for everyone: the solver is deterministic, but one answer is safer.
    solved = cdist.agree(resolve)
    chosen_plan = Plan.from_json(cdist.broadcast_text(solved.to_json()))
    optimizer = optimizer or chosen_plan.optimizer
    return ParallelModel(model, chosen_plan, optimizer, lr, optimizer_kwargs or {}, weights,
                         lora_cfg, adapter[1] if adapter else None, fused, position_ids)


class ParallelModel:
    """This rank's trainer: ``train_step`` over the global batch, ``forward`` for logits,
    and saving (Hugging Face, PEFT and sharded training checkpoints)."""

    def __init__(self, model: torch.nn.Module, plan: Plan, optimizer: str,
                 lr: float | None, optimizer_kwargs: dict,
                 weights: str | Path | None = None, lora: object | None = None,
                 lora_init: dict | None = None, fused: FusedOptions | None = None,
                 position_ids: bool = False) -> None:
        self.plan, self.chosen, self.lora = plan, plan.chosen, lora
        options = fused or FusedOptions()
        inside = in_backward(optimizer, plan)
        if is_svd(lora) and inside:
            raise CollieError(f"AdaLoRA with {optimizer} updating inside backward: AdaLoRA "
                              "adds its regulariser's gradient before the update and scores "
                              "ranks from the gradients after it, which are freed there as "
                              "they come; use an optimizer that steps after backward "
                              "(adamw, lion, ...)")
        self.program: RankProgram = build_rank_program(
            model, plan, weights, lora, lora_init, updates_in_backward=inside,
            position_ids=position_ids)
        self.updates = make_updates(self.program, optimizer, lr, optimizer_kwargs, options,
                                    inside)
        release_weights(model, self.program)  # last: a refusal above leaves the model whole
        self.stepper = Stepper(self.program, self.updates, options.max_grad_norm,
                               AdaLoraSteps(self.program, lora) if is_svd(lora) else None)

    # what this rank holds
    @property
    def stages(self) -> list[torch.nn.Module]:
        return self.program.stages

    @property
    def stage_ids(self) -> list[int]:
        return self.program.stage_ids

    @property
    def vocab_slice(self) -> tuple[int, int] | None:
        return self.program.vocab_slice

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer, None where updates happen inside backward."""
        return self.updates.optimizer

    @property
    def fused(self) -> object | None:
        """The in-backward update engine, else None."""
        return self.updates.fused

    @property
    def step_count(self) -> int:
        return self.stepper.step_count

    @property
    def last_grad_norm(self) -> float | None:
        return self.stepper.last_grad_norm

    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF name -> this rank's parameter (a tp slice; a DTensor under ZeRO 2/3)."""
        return self.program.local_parameters()

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.updates.inner()

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return self.updates.lr

    def set_lr(self, lr: float) -> None:
        """Use ``lr`` from the next update on, after backward or inside it (call it on
        every rank alike, between steps: a schedule)."""
        self.updates.set_lr(lr)

    def batch_rows(self) -> slice:
        """The rows of the global batch this rank's data-parallel replica trains on: what
        to pass as a ``local`` batch."""
        share = self.plan.global_batch_size // self.chosen.dp
        return slice(self.program.coords.dp * share, (self.program.coords.dp + 1) * share)

    # stepping
    def train_step(self, batch: dict, local: bool = False) -> float | None:
        """Forward, backward and one optimizer step over the global batch; returns its mean
        token loss (the same on every rank), or None without an update when no token of
        the batch counts in the loss. ``batch`` holds ``input_ids`` of
        [global_batch, seq], and may hold ``labels`` (-100: not counted) and a right-padded
        ``attention_mask``, or ``position_ids`` (parallelized with ``position_ids=True``);
        with ``local=True`` it holds only this rank's rows
        (:meth:`batch_rows`), so each replica reads only its share of the data."""
        return self.stepper.train_step(batch, local)

    def eval_loss(self, batch: dict, local: bool = False) -> tuple[float, int]:
        """Sum of token losses over ``batch`` (as :meth:`train_step` takes it) and how many
        tokens counted, on every rank; forward only, so no weight or state changes (the
        in-backward optimizers included)."""
        return self.stepper.eval_loss(batch, local)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the whole model's gradient to ``max_norm``; returns its norm."""
        return self.stepper.clip_grad_norm(max_norm)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits for ``input_ids`` of the planned shape [global_batch, seq] (and their
        ``position_ids``, parallelized with ``position_ids=True``), gathered on every
        rank."""
        return self.stepper.forward(input_ids, position_ids)

    # state in and out (collectives)
    def full_state_dict(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient) whole, on every rank, under its HF name."""
        return saving.full_state_dict(self.program, grads)

    def check_save_path(self, directory: str | Path, merge: bool = False) -> None:
        """Raise on every rank if :meth:`save_pretrained` may not write ``directory``."""
        saving.check_save_path(directory, saving.save_kind(self.lora, merge))

    def save_pretrained(self, directory: str | Path, merge: bool = False,
                        files: Iterable[str | Path] = ()) -> None:
        """Write a Hugging Face checkpoint that ``AutoModelForCausalLM.from_pretrained``
        loads; with LoRA a PEFT adapter, unless ``merge`` folds the adapters in. ``files``
        (a tokenizer's, ``generation_config.json``) are copied in beside the weights."""
        lora = self.lora
        if self.stepper.adalora is not None:  # the ranks allocated so far, as peft saves
            lora = self.stepper.adalora.config_to_save()
        saving.save_pretrained(self.program, lora, directory, merge, [Path(f) for f in files])

    def save_checkpoint(self, directory: str | Path, extra: dict[str, str] | None = None
                        ) -> None:
        """Write the training state sharded; resumable under another plan or GPU count.
        ``extra``: text files (name -> content) rank 0 adds to the folder."""
        ada = self.stepper.adalora
        if ada is not None:  # its importance averages and the ranks allocated so far
            extra = {**(extra or {}), ADALORA_FILE: ada.pattern_json()}
        saving.save_checkpoint(self.program, self.updates, self.step_count, directory, extra,
                               ada.states() if ada is not None else None)

    def load_checkpoint(self, directory: str | Path, fresh_optimizer: bool = False) -> None:
        """Restore weights, optimizer states and step from :meth:`save_checkpoint`; the
        states must be of this optimizer, unless ``fresh_optimizer`` starts it afresh."""
        step = saving.load_checkpoint(self.program, self.updates, directory, fresh_optimizer)
        if self.stepper.adalora is not None:
            self.stepper.adalora.load_checkpoint(directory)
        self.stepper.step_count = step
        if self.updates.fused is not None:
            self.updates.fused.step_count = step
