"""Every optimizer's facts in one table: what it keeps in memory per parameter, what an
update reads and writes, where it runs, its default learning rate.

Mixed precision (bf16/fp16) keeps an fp32 master copy of every trainable weight; pure
fp32 training updates the weights in place. Fused optimizers (LOMO, AdaLomo) update
each parameter inside the backward pass, so no gradient for the whole model is ever
held: only the one in flight (unless gradients accumulate over micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

from collie_compile.errors import CollieError


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    state_bytes: int  # fp32 state bytes per trainable element (factored states: see below)
    factored: bool = False  # AdaLomo: row + column statistics per matrix instead
    fused_backward: bool = False  # update inside backward; full gradients never stored
    step_temporaries: int = 2  # fp32 temporaries of the largest tensor during its update
    update_bytes: int = 28  # bytes an update reads and writes per trainable element
    default_lr: float = 1e-3
    description: str = ""


OPTIMIZERS: dict[str, OptimizerSpec] = {o.name: o for o in [
    OptimizerSpec("adamw", 8, description="Adam with decoupled weight decay: m, v"),
    OptimizerSpec("adam", 8, description="Adam: m, v"),
    OptimizerSpec("sgd", 0, step_temporaries=0, update_bytes=12,
                  description="plain SGD, no momentum"),
    OptimizerSpec("lion", 4, step_temporaries=1, update_bytes=20, default_lr=1e-4,
                  description="Lion: one momentum"),
    OptimizerSpec("adan", 16, step_temporaries=3, update_bytes=44,
                  description="Adan: m, v, n and the previous gradient"),
    OptimizerSpec("sophia", 8, default_lr=1e-4,
                  description="Sophia: m and the Hessian estimate h"),
    OptimizerSpec("lomo", 0, fused_backward=True, step_temporaries=1, update_bytes=6,
                  description="LOMO: SGD fused into backward, no state"),
    OptimizerSpec("adalomo", 0, factored=True, fused_backward=True, step_temporaries=2,
                  update_bytes=10,
                  description="AdaLomo: factored second moment fused into backward"),
]}


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise CollieError(f"unknown optimizer {name!r}; use one of "
                          f"{', '.join(OPTIMIZERS)}") from None
