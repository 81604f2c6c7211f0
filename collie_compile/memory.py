"""Per-GPU memory of a training step under a parallel layout.

Model states follow the ZeRO paper (Ψ trainable parameters per rank before data
parallelism, d = dp): stage 1 shards optimizer states and fp32 master weights over d,
stage 2 also gradients, stage 3 also the 16-bit weights. Activations are the bytes the
graph saves for backward (measured per block, :mod:`collie_compile.modelprofile`),
times the micro-batches in flight on a pipeline stage (1F1B: stage k of p holds
min(p - k, m); GPipe: all m).

A step's memory peaks at one of two moments, and we report the breakdown at the larger:
  F, the start of backward: weights + states + all saved activations + the loss's
     transients (gradients of the logits) or, with recomputation, one block's
     recomputed activations; plus accumulated gradients when micro-batches accumulate.
  B, the optimizer step: weights + states + all gradients + the update's temporaries.
Between the two, activations are freed as gradients appear, both linear in depth, so
the two ends bound every point in the backward pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import CollieError
from .modelprofile import ModelProfile
from .optimizers import OptimizerSpec

RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe", "interleaved")


@dataclass(frozen=True)
class Layout:
    """How one training step is split over GPUs (the parallel part of a plan)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch_size: int = 1
    seq_len: int = 2048
    recompute: str = "none"
    num_microbatches: int = 1
    schedule: str = "1f1b"

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self) -> None:
        for k in ("dp", "tp", "pp", "micro_batch_size", "seq_len", "num_microbatches"):
            if getattr(self, k) < 1:
                raise CollieError(f"{k} must be a positive integer, got {getattr(self, k)}")
        if self.zero not in (0, 1, 2, 3):
            raise CollieError(f"zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.recompute not in RECOMPUTE:
            raise CollieError(f"unknown recompute {self.recompute!r}; use one of "
                              f"{', '.join(RECOMPUTE)}")
        if self.schedule not in SCHEDULES:
            raise CollieError(f"unknown schedule {self.schedule!r}; use one of "
                              f"{', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU at its peak moment."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    other_bytes: int
    moment: str = "backward"  # "backward" (start of backward) or "step" (optimizer step)
    stage: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activations_bytes + self.other_bytes)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k.endswith("_bytes")}
        d["total_bytes"] = self.total_bytes
        return d


@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage holds: decoder blocks and whether it has the ends."""

    blocks: int
    has_embed: bool
    has_head: bool


@dataclass
class MemoryModel:
    """Evaluates a layout for one model profile, optimizer and dtype."""

    profile: ModelProfile
    optimizer: OptimizerSpec
    trainable_fraction: float = 1.0  # < 1 with LoRA: frozen weights keep no grads or states
    stage_layers: list[int] | None = field(default=None)

    def stages(self, layout: Layout) -> list[StageShape]:
        counts = self.stage_layers or even_split(self.profile.num_layers, layout.pp)
        return [StageShape(n, i == 0, i == len(counts) - 1) for i, n in enumerate(counts)]

    def params_per_rank(self, stage: StageShape, tp: int) -> float:
        p = self.profile
        block = p.block_params_sharded / tp + (p.block_params - p.block_params_sharded)
        n = stage.blocks * block
        if stage.has_embed:
            n += p.embed_params / tp
        if stage.has_head:
            n += p.head_params / tp
            if not stage.has_embed:  # tied LM head needs its own copy on the last stage
                n += p.tied_params / tp
        return n

    def estimate(self, layout: Layout) -> MemoryBreakdown:
        """The fullest GPU's breakdown under ``layout``."""
        layout.validate()
        return max((self.estimate_stage(layout, k) for k in range(layout.pp)),
                   key=lambda m: m.total_bytes)

    def estimate_stage(self, layout: Layout, k: int) -> MemoryBreakdown:
        p, opt = self.profile, self.optimizer
        stage = self.stages(layout)[k]
        tp, d, b = layout.tp, layout.dp, layout.micro_batch_size
        w = p.itemsize
        # fp32 master copies for 16-bit weights; fused optimizers update 16-bit weights directly.
        master = 0 if p.dtype == "fp32" or opt.fused_backward else 4
        psi = self.params_per_rank(stage, tp)
        trainable = psi * self.trainable_fraction
        largest = p.largest_param / tp

        weights = psi * w / (d if layout.zero == 3 else 1)
        state_per_elem = opt.state_bytes + master
        states = trainable * state_per_elem
        if opt.factored:
            states += p.factored_state_elems / p.num_params * trainable * 4
        states /= d if layout.zero >= 1 else 1
        accumulate = layout.num_microbatches > 1
        all_grads = trainable * w / (d if layout.zero >= 2 else 1)
        in_flight_grad = min(largest, trainable) * w

        # Activations of the micro-batches in flight on this stage.
        if layout.schedule == "gpipe":
            in_flight = layout.num_microbatches
        else:
            in_flight = min(layout.pp - k, layout.num_microbatches)
        act = p.activations(layout.recompute).per_rank(tp)
        per_sample = stage.blocks * act
        if stage.has_embed:
            per_sample += p.act_embed
        if stage.has_head:
            per_sample += p.act_head / tp
        activations = in_flight * b * per_sample + p.act_fixed

        # Transients at the start of backward: gradients of the logits (two [b, s, V] fp32
        # buffers in cross-entropy's backward), or one block recomputed in full.
        head_tmp = 2 * b * p.logits_bytes / tp if stage.has_head else 0
        recompute_tmp = 0.0
        if layout.recompute != "none" and stage.blocks:
            recompute_tmp = b * (p.act_none.per_rank(tp) - act)
        gather_tmp = 0.0
        if layout.zero == 3 and d > 1:  # one block gathered, the next prefetched
            gather_tmp = 2 * (p.block_params_sharded / tp) * w
        step_tmp = opt.step_temporaries * min(largest, trainable) * 4

        if opt.fused_backward and not accumulate:
            # The one gradient in flight and its update come after the loss's transients.
            grads_f = 0
            other_f = max(head_tmp, recompute_tmp, in_flight_grad + step_tmp) + gather_tmp
        else:
            grads_f = all_grads if accumulate else 0
            other_f = max(head_tmp, recompute_tmp) + gather_tmp
        at_backward = MemoryBreakdown(int(weights), int(grads_f), int(states),
                                      int(activations), int(other_f), "backward", k)
        if opt.fused_backward and not accumulate:
            return at_backward
        at_step = MemoryBreakdown(int(weights), int(all_grads), int(states), p.act_fixed,
                                  int(step_tmp), "step", k)
        return max(at_backward, at_step, key=lambda m: m.total_bytes)


def even_split(layers: int, parts: int) -> list[int]:
    """Blocks per pipeline stage, as even as possible, extra blocks on the later stages
    (the first stage also holds the most in-flight activations)."""
    if parts > layers:
        raise CollieError(f"pp={parts} exceeds the model's {layers} layers; use pp <= {layers}")
    base, extra = divmod(layers, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def estimate_json(model: str, num_params: int, trainable: int, gpu_name: str, gpu_memory: int,
                  layout: Layout, optimizer: str, dtype: str, mem: MemoryBreakdown) -> str:
    """The ``estimate --json`` document (its keys are a contract other tools read)."""
    doc = {
        "model": model, "num_params": num_params, "trainable_params": trainable,
        "gpu": gpu_name, "gpu_memory_bytes": gpu_memory,
        "layout": {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "zero": layout.zero,
                   "micro_batch_size": layout.micro_batch_size, "seq_len": layout.seq_len,
                   "recompute": layout.recompute},
        "optimizer": optimizer, "dtype": dtype, "per_gpu": mem.to_dict(),
        "fits": mem.total_bytes <= gpu_memory,
    }
    return json.dumps(doc, indent=2)
