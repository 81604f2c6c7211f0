"""Every optimizer's facts in one table: what it keeps in memory per parameter, what an
update reads and writes, where it runs, its default learning rate.

Mixed precision (bf16/fp16) keeps an fp32 master copy of every trainable weight; pure
fp32 training updates the weights in place. Fused optimizers (LOMO, AdaLomo) update
each parameter inside the backward pass, so no gradient for the whole model is ever
held: only the one in flight (unless gradients accumulate over micro-batches). LOMO and
AdaLomo keep no master (16-bit weights are updated directly). Lion, AdamW, Adam and Adan
step after backward or, with ``update_in_backward``, inside it (:meth:`in_backward`);
global-norm clipping in the two-pass mode then runs forward and backward twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from collie_compile.errors import CollieError

# Global-norm clipping inside backward: measure the norm in a first backward, or use the
# previous step's (collie_compile.optim.in_backward)
CLIP_MODES = ("two-pass", "stale")


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
    in_backward_rule: bool = False  # may also update inside backward (update_in_backward)
    keeps_master: bool = True  # fp32 master copy of 16-bit weights
    backward_passes: int = 1  # 2: a measuring backward first (two-pass clipping)

    def in_backward(self, two_pass: bool = False) -> OptimizerSpec:
        """This rule updating inside backward; ``two_pass``: with a measuring backward
        before the updating one (two-pass global-norm clipping, fp16 loss scaling)."""
        if not (self.fused_backward or self.in_backward_rule):
            raise CollieError(f"{self.name} cannot update inside backward; in-backward "
                              f"rules: {', '.join(in_backward_names())}")
        return replace(self, fused_backward=True, backward_passes=2 if two_pass else 1)


OPTIMIZERS: dict[str, OptimizerSpec] = {o.name: o for o in [
    OptimizerSpec("adamw", 8, description="Adam with decoupled weight decay: m, v",
                  in_backward_rule=True),
    OptimizerSpec("adam", 8, description="Adam: m, v", in_backward_rule=True),
    OptimizerSpec("sgd", 0, step_temporaries=0, update_bytes=12,
                  description="plain SGD, no momentum"),
    OptimizerSpec("lion", 4, step_temporaries=1, update_bytes=20, default_lr=1e-4,
                  description="Lion: one momentum", in_backward_rule=True),
    OptimizerSpec("adan", 16, step_temporaries=3, update_bytes=44,
                  description="Adan: m, v, n and the previous gradient",
                  in_backward_rule=True),
    OptimizerSpec("sophia", 8, default_lr=1e-4,
                  description="Sophia: m and the Hessian estimate h"),
    OptimizerSpec("lomo", 0, fused_backward=True, step_temporaries=1, update_bytes=6,
                  description="LOMO: SGD fused into backward, no state", keeps_master=False),
    OptimizerSpec("adalomo", 0, factored=True, fused_backward=True, step_temporaries=2,
                  update_bytes=10,
                  description="AdaLomo: factored second moment fused into backward",
                  keeps_master=False),
]}


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise CollieError(f"unknown optimizer {name!r}; use one of "
                          f"{', '.join(OPTIMIZERS)}") from None


def in_backward_names() -> list[str]:
    """Optimizers that can update inside backward."""
    return [o.name for o in OPTIMIZERS.values() if o.fused_backward or o.in_backward_rule]
