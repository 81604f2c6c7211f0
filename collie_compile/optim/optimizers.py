"""Optimizers that step after backward (besides torch's own), and the name → class table
``parallelize`` and the CPU measurements share.

Every rule here is elementwise per parameter, so a tensor- or data-parallel shard
updates exactly as the whole tensor would. 16-bit parameters keep an fp32 master copy,
also under torch's AdamW, Adam and SGD rules (which torch itself would run in 16 bits).
The fused-in-backward LOMO and AdaLomo are in :mod:`collie_compile.optim.in_backward`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from collie_compile.kernels.adan import adan_update
from collie_compile.kernels.lion import lion_update
from collie_compile.optim.specs import get_optimizer


class _MasterWeights(torch.optim.Optimizer):
    """Per-tensor loop with an fp32 master copy of 16-bit parameters; subclasses give
    ``_update(w, g, state, group)`` on fp32 ``w`` and ``g``."""

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
                state["step"] += 1
                w = state.get("master", p)
                self._update(w, p.grad.float(), state, group)
                if w is not p:
                    p.copy_(w)
        return loss


class AdamW(_MasterWeights):
    """torch's AdamW rule (its single-tensor functional form) on fp32 masters, for 16-bit
    weights: torch's own optimizers keep no master copy and their states in the weights'
    dtype, so an update under half a bf16 ulp of the weight would be lost every step.
    fp32 weights use ``torch.optim.AdamW`` itself."""

    decoupled = True

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        if "exp_avg" not in state:
            state.update(exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w),
                         step_t=torch.zeros((), dtype=torch.float32))
        b1, b2 = group["betas"]
        adam([w], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step_t"]],
             foreach=False, decoupled_weight_decay=self.decoupled, amsgrad=False, beta1=b1,
             beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False)


class Adam(AdamW):
    """torch's Adam rule (L2 weight decay) on fp32 masters of 16-bit weights."""

    decoupled = False

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class SGD(_MasterWeights):
    """torch's SGD rule on fp32 masters of 16-bit weights."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        buf = [state.get("momentum_buffer")]
        sgd([w], [g], buf, foreach=False, weight_decay=group["weight_decay"],
            momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=False)
        if buf[0] is not None:  # made on the first step with momentum
            state["momentum_buffer"] = buf[0]


class Lion(_MasterWeights):
    """Lion (Chen et al. 2023): p ← p(1 - lr·wd) - lr·sign(β1·m + (1-β1)·g);
    m ← β2·m + (1-β2)·g. One fused pass per tensor (:mod:`collie_compile.kernels.lion`)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(w)
        lion_update(w, g, state["exp_avg"], group["lr"], *group["betas"],
                    group["weight_decay"])


class Adan(_MasterWeights):
    """Adan (Xie et al. 2022), Nesterov momentum estimation with decoupled weight decay:

        d = g - g_prev (0 at step 1);  m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·d
        n ← β3·n + (1-β3)·(g + β2·d)²
        p ← p(1 - lr·wd) - lr·(m/(1-β1ᵗ) + β2·v/(1-β2ᵗ)) / (sqrt(n/(1-β3ᵗ)) + eps)
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.02) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        if "m" not in state:
            for key in ("m", "v", "n", "prev_grad"):
                state[key] = torch.zeros_like(w)
        adan_update(w, g, state, group["lr"], group["betas"], group["eps"],
                    group["weight_decay"])


class SophiaG(_MasterWeights):
    """Sophia (Liu et al. 2023) with a diagonal Gauss-Newton estimate h:

        m ← β1·m + (1-β1)·g;  p ← p(1 - lr·wd) - lr·sign(m)·min(|m| / (ρ·bs·h + 1e-15), 1)
        every ``hessian_interval`` steps: h ← β2·h + (1-β2)·ĝ²

    ``bs`` is the number of tokens in a batch (ĝ is the gradient of the mean loss, so
    bs·ĝ² estimates the Gauss-Newton diagonal). The paper's ĝ comes from a backward on
    labels sampled from the model; :meth:`update_hessian` takes such gradients from the
    caller. Without one, ``step`` uses the batch's own gradient at the interval (the
    empirical-Fisher variant the paper compares with), which needs no extra pass.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, bs: int = 1, hessian_interval: int = 10) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay,
                                      bs=bs, hessian_interval=hessian_interval))
        self._hessian_given = False

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h ← β2·h + (1-β2)·ĝ² from the parameters' current ``.grad`` (the caller's
        backward on sampled labels)."""
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    h = self.state[p].setdefault(
                        "hessian", torch.zeros_like(p, dtype=torch.float32))
                    g = p.grad.float()
                    h.mul_(b2).addcmul_(g, g, value=1 - b2)
        self._hessian_given = True

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        b1, b2 = group["betas"]
        if "m" not in state:
            state["m"] = torch.zeros_like(w)
            state.setdefault("hessian", torch.zeros_like(w))
        h = state["hessian"]
        if not self._hessian_given and (state["step"] - 1) % group["hessian_interval"] == 0:
            h.mul_(b2).addcmul_(g, g, value=1 - b2)
        m = state["m"].mul_(b1).add_(g, alpha=1 - b1)
        # two temporaries at a time, as the cost model counts
        ratio = m.abs().div_(h.mul(group["rho"] * group["bs"]).add_(1e-15))
        ratio.clamp_(max=1.0).mul_(m.sign())
        w.mul_(1 - group["lr"] * group["weight_decay"]).add_(ratio, alpha=-group["lr"])


REGULAR: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
    "lion": Lion, "adan": Adan, "sophia": SophiaG,
}
WITH_MASTERS = {"adamw": AdamW, "adam": Adam, "sgd": SGD}  # for 16-bit weights


# Each rule's defaults (torch's for AdamW and Adam, lion-pytorch's for Lion, the Adan
# paper's): after backward and inside it alike.
DEFAULTS: dict[str, dict] = {
    "adamw": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "adam": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "lion": dict(betas=(0.9, 0.99), weight_decay=0.0),
    "adan": dict(betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02),
}


def optimizer_options(name: str, lr: float | None, kwargs: dict) -> dict:
    """Keyword arguments for ``name``'s class: its defaults, ``kwargs``, then ``lr``."""
    opts = dict(DEFAULTS.get(name.lower(), {}))
    opts.update(kwargs)
    opts["lr"] = lr if lr is not None else get_optimizer(name).default_lr
    return opts


def single_process_optimizer(name: str, params: list[torch.nn.Parameter], lr: float | None,
                             kwargs: dict | None = None, update_in_backward: bool = False
                             ) -> torch.optim.Optimizer:
    """What ``parallelize(optimizer=name, update_in_backward=...)`` runs, for one process
    on one module: the reference its parallel runs are checked against."""
    from collie_compile.optim.in_backward import InBackward

    cls = optimizer_class(name, params[0].dtype if params else torch.float32)
    opts = optimizer_options(name, lr, kwargs or {})
    if cls is None or update_in_backward:
        return InBackward(params, rule=name.lower(), **opts)
    return cls(params, **opts)


def optimizer_class(name: str, dtype: torch.dtype = torch.float32
                    ) -> type[torch.optim.Optimizer] | None:
    """The class that steps after backward for ``name`` on weights of ``dtype`` (16-bit
    weights get fp32 masters, as the cost model prices them); None for the fused-in-backward
    ones (LOMO, AdaLomo). Unknown names raise a clear error."""
    key = name.lower()
    if get_optimizer(name).fused_backward:  # raises for an unknown name
        return None
    return WITH_MASTERS.get(key, REGULAR[key]) if dtype != torch.float32 else REGULAR[key]
