"""What a user asks for, as data: the training request (GPUs, shapes, dtype, memory kept
free), the layout choices they pin and the LoRA they train, each with its checks in one
place. ``estimate``, ``plan``, ``parallelize``, ``train`` and the CLI's argument groups
are built from these, so a pin one entry point takes, all take."""

from __future__ import annotations

import argparse
import numbers
from dataclasses import dataclass, fields

from collie_compile.dtypes import check_dtype
from collie_compile.errors import CollieError, named
from collie_compile.layout import LORA_TARGETS_WITHOUT_RANK, RECOMPUTE, SCHEDULES

# parallelize's global batch when none is given: a fine-tuning run's size (8 sequences a
# GPU: 64 on 8 GPUs), not the planner's pre-training default of ~2M tokens a step
FINE_TUNING_SEQUENCES_PER_GPU = 8


@dataclass(frozen=True)
class Request:
    """The run asked for; None leaves a value to the entry point's default."""

    gpus: int | None = None
    seq_len: int | None = None  # tokens per sequence
    global_batch_size: int | None = None  # sequences per optimizer step
    dtype: str | None = None  # the weights' dtype name
    memory_reserve: float | None = None  # fraction of each GPU's memory kept free

    def __post_init__(self) -> None:
        if self.gpus is not None and (not isinstance(self.gpus, numbers.Integral)
                                      or self.gpus < 1):
            raise CollieError(f"{named('gpus')} must be a positive integer, got {self.gpus}")
        if self.seq_len is not None and self.seq_len < 2:
            raise CollieError(f"{named('seq_len')} must be a positive integer of at least 2, "
                              f"got {self.seq_len}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise CollieError(f"{named('global_batch_size')} must be positive, got "
                              f"{self.global_batch_size}")
        if self.dtype is not None:
            check_dtype(self.dtype)
        if self.memory_reserve is not None and not 0 <= self.memory_reserve < 1:
            raise CollieError(f"{named('memory_reserve')} must be in [0, 1), got "
                              f"{self.memory_reserve}")


@dataclass(frozen=True)
class Pins:
    """Layout choices fixed by the user; None leaves the choice to the planner."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    zero: int | None = None
    micro_batch_size: int | None = None
    schedule: str | None = None
    recompute: str | None = None  # the same mode for every layer
    virtual_stages: int | None = None  # model chunks per GPU; implies the interleaved one
    ep: int | None = None  # ranks splitting the routed experts, out of dp

    HELP = {
        "dp": "pin the data-parallel size", "tp": "pin the tensor-parallel size",
        "pp": "pin the pipeline-parallel size", "zero": "pin the ZeRO stage (0-3)",
        "micro_batch_size": "pin the micro-batch (sequences per micro-batch step)",
        "schedule": f"pin the pipeline schedule ({', '.join(SCHEDULES)})",
        "recompute": f"pin recomputation for every layer ({', '.join(RECOMPUTE)})",
        "virtual_stages": "pin the interleaved schedule's model chunks per GPU (default 2)",
        "ep": "pin the expert-parallel size (ranks splitting a mixture of experts' routed "
              "experts, out of dp)",
    }

    def __post_init__(self) -> None:
        for k in ("dp", "tp", "pp", "micro_batch_size", "ep"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, numbers.Integral) or v < 1):
                raise CollieError(f"{named(k)} must be a positive integer, got {v!r}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise CollieError(f"{named('zero')} must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise CollieError(f"unknown recompute {self.recompute!r}; use one of "
                              f"{', '.join(RECOMPUTE)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise CollieError(f"unknown schedule {self.schedule!r}; use one of "
                              f"{', '.join(SCHEDULES)}")
        if self.virtual_stages is not None and (not isinstance(self.virtual_stages,
                                                               numbers.Integral)
                                                or self.virtual_stages < 2):
            raise CollieError(f"{named('virtual_stages')} (model chunks per GPU of the "
                              "interleaved schedule) must be 2 or more, got "
                              f"{self.virtual_stages!r}")
        if self.virtual_stages is not None and self.schedule not in (None, "interleaved"):
            raise CollieError(f"{named('virtual_stages')} applies to the interleaved "
                              f"schedule, not {self.schedule!r}; drop one of them")

    def given(self) -> dict[str, int | str]:
        """The pinned choices by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """One ``--<pin>`` option per field (``--micro-batch`` for micro_batch_size)."""
        group = parser.add_argument_group("pins (default: the planner chooses)")
        for f in fields(Pins):
            flags = ["--micro-batch", "--micro-batch-size"] if f.name == "micro_batch_size" \
                else ["--" + f.name.replace("_", "-")]
            kind = {"schedule": dict(choices=SCHEDULES), "recompute": dict(choices=RECOMPUTE),
                    "zero": dict(type=int, choices=[0, 1, 2, 3])}.get(f.name, dict(type=int))
            group.add_argument(*flags, dest=f.name, default=None, help=Pins.HELP[f.name],
                               **kind)

    @staticmethod
    def from_args(args: argparse.Namespace) -> Pins:
        return Pins(**{f.name: getattr(args, f.name) for f in fields(Pins)})


@dataclass(frozen=True)
class LoraRequest:
    """LoRA adapters to train (peft's ``LoraConfig`` fields); rank None: full training."""

    rank: int | None = None
    alpha: float | None = None  # scale; default 2 x rank
    targets: str | tuple[str, ...] | None = None  # peft's target_modules; default q_proj, v_proj
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank is None:
            if self.targets is not None or self.alpha is not None:
                raise CollieError(LORA_TARGETS_WITHOUT_RANK)
            return
        if not isinstance(self.rank, int) or self.rank < 1:
            raise CollieError(f"{named('lora_rank')} must be a positive integer, got "
                              f"{self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise CollieError(f"lora_dropout must be in [0, 1), got {self.dropout}")
