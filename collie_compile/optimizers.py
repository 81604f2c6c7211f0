"""What each optimizer keeps in memory, per parameter.

Mixed precision (bf16/fp16) keeps an fp32 master copy of every trainable weight; pure
fp32 training updates the weights in place. Fused optimizers (LOMO, AdaLomo) update
each parameter inside the backward pass, so no gradient for the whole model is ever
held: only the one in flight (unless gradients accumulate over micro-batches).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import CollieError
from .kernels.adalomo import adalomo_state, adalomo_update_reference
from .kernels.lion import lion_update
from .kernels.lomo import lomo_update


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    state_bytes: int  # fp32 state bytes per trainable element (factored states: see below)
    factored: bool = False  # AdaLomo: row + column statistics per matrix instead
    fused_backward: bool = False  # update inside backward; full gradients never stored
    step_temporaries: int = 2  # fp32 temporaries of the largest tensor during its update
    description: str = ""


OPTIMIZERS: dict[str, OptimizerSpec] = {o.name: o for o in [
    OptimizerSpec("adamw", 8, description="Adam with decoupled weight decay: m, v"),
    OptimizerSpec("adam", 8, description="Adam: m, v"),
    OptimizerSpec("sgd", 0, step_temporaries=0, description="plain SGD, no momentum"),
    OptimizerSpec("lion", 4, description="Lion: one momentum"),
    OptimizerSpec("adan", 16, step_temporaries=3,
                  description="Adan: m, v, n and the previous gradient"),
    OptimizerSpec("sophia", 8, description="Sophia: m and the Hessian estimate h"),
    OptimizerSpec("lomo", 0, fused_backward=True, step_temporaries=1,
                  description="LOMO: SGD fused into backward, no state"),
    OptimizerSpec("adalomo", 0, factored=True, fused_backward=True, step_temporaries=2,
                  description="AdaLomo: factored second moment fused into backward"),
]}


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise CollieError(f"unknown optimizer {name!r}; use one of "
                          f"{', '.join(OPTIMIZERS)}") from None


class Lion(torch.optim.Optimizer):
    """Lion with fp32 master weights for 16-bit parameters (updated one tensor at a time,
    so at most one parameter's fp32 gradient exists at once)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
                target = state.get("master", p)
                lion_update(target, p.grad, state["exp_avg"], group["lr"], b1, b2,
                            group["weight_decay"])
                if target is not p:
                    p.copy_(target)
                p.grad = None  # free it now: the next tensor's update needs the room


class LOMO(torch.optim.Optimizer):
    """LOMO: each parameter is updated by a post-accumulate-grad hook as soon as its
    gradient is final, and the gradient is freed at once. ``step()`` has nothing left to do.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._hooks = []
        for group in self.param_groups:
            for p in group["params"]:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    functools.partial(self._update_param, group=group)))

    @torch.no_grad()
    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        lomo_update(p, p.grad, group["lr"], group["weight_decay"])
        p.grad = None

    def step(self, closure: None = None) -> None:
        return None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class AdaLomo(LOMO):
    """AdaLomo: LOMO's fused-in-backward update with a factored second moment."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        if p not in self.state or not self.state[p]:
            self.state[p] = adalomo_state(p)
        adalomo_update_reference(p, p.grad, self.state[p], group["lr"], group["weight_decay"])
        p.grad = None
