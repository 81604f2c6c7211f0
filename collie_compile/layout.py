"""The rules a layout obeys, shared by the cost model, the planner, plans and the runtime:
recomputation modes, pipeline schedules, how blocks split over stages, when the
vocabulary splits under tp, and how LoRA targets are written down."""

from __future__ import annotations

from collie_compile.errors import CollieError

RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe", "interleaved")
INTERLEAVED_CHUNKS = 2  # model chunks per GPU of an interleaved schedule, unless given


DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama-style models
LORA_TARGETS_WITHOUT_RANK = ("lora_targets or lora_alpha (--lora-targets, --lora-alpha) without "
                             "lora_rank trains nothing as LoRA; give the adapters' rank too "
                             "(lora_rank=8, --lora-rank 8)")


def canonical_lora_targets(targets: str | list[str] | tuple[str, ...] | None
                           ) -> str | list[str]:
    """LoRA targets as plans record and compare them: a regex string as given, module
    names sorted (None: the default q_proj, v_proj)."""
    if isinstance(targets, str):
        return targets
    return sorted(DEFAULT_LORA_TARGETS if targets is None else targets)


def even_split(layers: int, parts: int) -> list[int]:
    """Blocks per pipeline stage, as even as possible, extra blocks on the later stages
    (the first stage also holds the most in-flight activations)."""
    if parts > layers:
        raise CollieError(f"pp={parts} exceeds the model's {layers} layers; use pp <= {layers}")
    base, extra = divmod(layers, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def vocab_parallel(vocab_size: int, tied: bool, tp: int) -> bool:
    """Whether tensor parallelism splits the embedding, LM head and logits over the
    vocabulary: the runtime's rule, priced here. Not where tp does not divide the
    vocabulary, nor where the head is tied to the embedding (both stay whole)."""
    return tp > 1 and vocab_size % tp == 0 and not tied


# Graph node kinds (capture.annotate) whose time is matrix products, compute-bound, and
# whose outputs selective recomputation keeps; "experts" are routed experts' grouped GEMMs
MATMUL_KINDS = ("linear", "attention", "experts")


# Mixtures of experts under expert parallelism: the busiest rank's rows over the mean
# (routing is never exactly even). An assumption, not a measurement (a load-balancing loss
# keeps trained routers near even); ``--expert-imbalance`` sets it, 1.0 prices perfect
# balance. Time and memory both price the busiest rank.
EXPERT_IMBALANCE = 1.2
