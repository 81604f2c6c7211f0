"""Optimizer updates fused into the backward pass ("gradient release"): LOMO and AdaLomo,
and Lion, AdamW, Adam and Adan with ``update_in_backward``.

Each parameter is updated as soon as its gradient is final and the gradient is freed at
once, so the whole model's gradient never sits in memory. Stateful rules keep their fp32
states (and an fp32 master of 16-bit weights, unless stochastic rounding replaces it) per
parameter, shaped like this rank's slice, under the same keys as the after-backward
optimizers (:mod:`collie_compile.optim.optimizers`), so checkpoints pass between the two.

"Final" means after the last micro-batch's accumulation (counted here, or by the
data-parallel GradReducer that then calls :meth:`FusedBackward.on_final`), after the
data-parallel reduction (the reducer's bucket, or FSDP2's reduce-scatter, which runs
post-accumulate-grad hooks on the sharded parameter), and after the sum over
tensor-parallel peers that hold partial gradients (GQA-shared KV heads, LoRA's
replicated factor).

Anything global must be known before the first update:

- global-norm clipping, ``clip_mode="two-pass"`` (LOMO's way): a measuring backward
  computes ‖g‖ over every rank and frees each gradient without updating; a second
  backward updates with the clip factor. Exact, at the price of one more forward/backward.
- ``clip_mode="stale"``, the single-pass alternative: clip with the norm measured during
  the previous step's update pass (the first step measures first). One backward per step;
  the factor is one step old, which matters only while the norm moves fast.
- clip by value: elementwise on ĝ, single pass.
- fp16 dynamic loss scaling: the loss is multiplied by S. A measuring pass checks every
  gradient for inf/nan (agreed over all ranks); on overflow no parameter is touched, the
  step is skipped and S is lowered; otherwise the update pass divides by S. So no
  parameter is ever left half-updated. S grows after ``growth_interval`` clean steps.

Both passes see the same RNG state, so dropout masks (and gradients) agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError
from collie_compile.kernels.adalomo import Allsum, adalomo_state, adalomo_update
from collie_compile.kernels.adamw import adamw_update
from collie_compile.kernels.adan import adan_update
from collie_compile.kernels.lion import lion_update
from collie_compile.kernels.lomo import lomo_update
from collie_compile.optim.specs import CLIP_MODES

# fp32 states per parameter of the stateful rules, named as their after-backward classes
STATE_KEYS = {"lion": ("exp_avg",), "adamw": ("exp_avg", "exp_avg_sq"),
              "adam": ("exp_avg", "exp_avg_sq"), "adan": ("m", "v", "n", "prev_grad")}
RULES = ("lomo", "adalomo", *STATE_KEYS)


@dataclass
class LossScaler:
    """Dynamic loss scale (fp16): halve on overflow, double after clean steps."""

    scale: float = 2.0**16
    growth_interval: int = 1000
    backoff: float = 0.5
    growth: float = 2.0
    clean_steps: int = 0
    skipped_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= self.growth

    def to_dict(self) -> dict:
        return asdict(self)


class FusedBackward:
    """The in-backward update of a set of named parameters.

    ``options`` are the rule's hyperparameters besides lr and weight decay (``betas``,
    ``eps``). ``allsum_for(name)`` gives AdaLomo the reduction over the ranks that hold
    the other slices of a sharded parameter; ``partial_group(name)`` the group whose
    gradients must be summed first; ``counts_in_norm(name)`` whether this rank's copy
    counts in the global norm (each slice once over all ranks); ``owns(name)`` whether
    this rank updates it (ZeRO-1: one data-parallel rank per parameter, which keeps its
    states; ``after_update`` then sends the updated weights to the others). Defaults
    suit one process.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], rule: str,
                 lr: float, weight_decay: float = 0.0, *, max_grad_norm: float | None = None,
                 clip_mode: str = "two-pass", clip_value: float | None = None,
                 loss_scaler: LossScaler | None = None, stochastic_rounding: bool = False,
                 allsum_for: Callable[[str], Allsum | None] = lambda name: None,
                 partial_group: Callable[[str], object] = lambda name: None,
                 counts_in_norm: Callable[[str], bool] = lambda name: True,
                 owns: Callable[[str], bool] = lambda name: True,
                 after_update: Callable[[], None] | None = None,
                 options: dict | None = None, seed: int = 0) -> None:
        if rule not in RULES:
            raise CollieError(f"no fused-in-backward rule {rule!r}; use one of {RULES}")
        if clip_mode not in CLIP_MODES:
            raise CollieError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        self.rule = rule
        # lr and weight decay live in one dict, which InBackward shares with its
        # param_groups[0]: a torch lr scheduler (or set_lr) changes the next update
        self.hyper: dict = {"lr": lr, "weight_decay": weight_decay}
        self.max_grad_norm, self.clip_mode, self.clip_value = max_grad_norm, clip_mode, clip_value
        self.loss_scaler, self.stochastic = loss_scaler, stochastic_rounding
        self.params = dict(named_params)
        self._names = {id(p): n for n, p in self.params.items()}
        self._index = {n: i for i, n in enumerate(self.params)}
        self._allsum, self._partial, self._counts = allsum_for, partial_group, counts_in_norm
        self.owns, self._after_update = owns, after_update
        self.options = dict(options or {})
        self.state: dict[str, dict] = {}
        self.seed, self.step_count = seed, 0
        self.mode = "update"  # or "measure"
        self.coef, self.last_grad_norm, self._stale_norm = 1.0, None, None
        # on the parameters' device: no host sync per gradient
        device = next(iter(self.params.values())).device if self.params else None
        self._sumsq = torch.zeros((), dtype=torch.float64, device=device)
        self.accumulations = 1
        self.accumulations_of: dict[int, int] = {}  # id(p) -> its own count, where it differs
        self._seen: dict[int, int] = {}
        self._hooks: list = []

    @property
    def lr(self) -> float:
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyper["lr"] = value

    @property
    def weight_decay(self) -> float:
        return self.hyper["weight_decay"]

    # -- hooks ---------------------------------------------------------------------------

    def attach(self, params: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Update ``params`` (default: all) from post-accumulate-grad hooks, after
        ``accumulations`` accumulations. Parameters whose gradient reaches us another
        way (a GradReducer's ``on_ready``) are not attached."""
        for p in self.params.values() if params is None else params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_accumulated))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _on_accumulated(self, p: torch.nn.Parameter) -> None:
        n = self._seen.get(id(p), 0) + 1
        self._seen[id(p)] = n
        if n == self.accumulations_of.get(id(p), self.accumulations):
            del self._seen[id(p)]  # the next step counts afresh
            self.on_final(p)

    @torch.no_grad()
    def on_final(self, p: torch.nn.Parameter) -> None:
        """``p.grad`` is complete (accumulated and reduced over dp): update and free it."""
        name = self._names[id(p)]
        g = local_tensor(p.grad)
        group = self._partial(name)
        if group is not None:
            dist.all_reduce(g, group=group)
        scale = self.loss_scaler.scale if self.loss_scaler else 1.0
        if self.mode == "measure" or self.clip_mode == "stale":
            if self._counts(name):
                self._sumsq += g.double().square().sum() / scale**2
            if self.mode == "measure":
                p.grad = None
                return
        if self.clip_value is not None:
            g.div_(scale).clamp_(-self.clip_value, self.clip_value)
            scale = 1.0
        grad_scale = scale / self.coef
        seed = self.seed + 1_000_003 * self.step_count + self._index[name]
        w = local_tensor(p)
        if self.rule == "lomo":
            lomo_update(w, g, self.lr, self.weight_decay, grad_scale, self.stochastic, seed)
        elif self.rule == "adalomo":
            state = self.state.get(name)
            if state is None:
                state = self.state[name] = adalomo_state(w)
            adalomo_update(w, g, state, self.lr, self.weight_decay, grad_scale,
                           self._allsum(name), self.stochastic, seed)
        elif self.owns(name):
            self._stateful_update(name, w, g, grad_scale, seed)
        p.grad = None

    def fresh_state(self, w: torch.Tensor) -> dict:
        """Zero states for local weight ``w`` under a stateful rule (and its fp32 master)."""
        state: dict = {"step": 0}
        for key in STATE_KEYS[self.rule]:
            state[key] = torch.zeros_like(w, dtype=torch.float32)
        if w.dtype != torch.float32 and not self.stochastic:
            state["master"] = w.float()
        return state

    def _stateful_update(self, name: str, w: torch.Tensor, g: torch.Tensor,
                         grad_scale: float, seed: int) -> None:
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = self.fresh_state(w)
        st["step"] += 1
        target = st.get("master", w)
        sr = self.stochastic and target is w
        lr, wd, o = self.lr, self.weight_decay, self.options
        if self.rule == "lion":
            lion_update(target, g, st["exp_avg"], lr, *o["betas"], wd, sr, seed, grad_scale)
        elif self.rule == "adan":
            adan_update(target, g, st, lr, o["betas"], o["eps"], wd, grad_scale, sr, seed)
        else:
            adamw_update(target, g, st["exp_avg"], st["exp_avg_sq"], lr, *o["betas"],
                         o["eps"], wd, st["step"], self.rule == "adamw", grad_scale, sr, seed)
        if target is not w:
            w.copy_(target)

    # -- a step ----------------------------------------------------------------------------

    @property
    def needs_measuring_pass(self) -> bool:
        if self.loss_scaler is not None:
            return True
        if self.max_grad_norm is None:
            return False
        return self.clip_mode == "two-pass" or self._stale_norm is None

    def step(self, closure: Callable[[], float]) -> float:
        """One training step: ``closure`` runs forward and backward over the whole batch
        (all micro-batches; it scales the loss by :attr:`loss_scale`). Runs it once or,
        to measure first, twice. Returns the closure's last result."""
        if self.needs_measuring_pass:
            rng = _rng_state()
            result = self._pass("measure", closure)
            norm = self._global_norm()
            overflow = not math.isfinite(norm)
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow)
            if overflow:
                self.last_grad_norm = norm
                return result  # skipped: nothing was updated
            _set_rng_state(rng)
            self.coef = self._clip_coef(norm)
        elif self.max_grad_norm is not None:  # stale
            self.coef = self._clip_coef(self._stale_norm)
        result = self._pass("update", closure)
        if self._after_update is not None:
            self._after_update()
        if self.max_grad_norm is not None and self.clip_mode == "stale":
            self._stale_norm = self.last_grad_norm = self._global_norm()
        self.step_count += 1
        self.coef = 1.0
        return result

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    def _pass(self, mode: str, closure: Callable[[], float]) -> float:
        self.mode, self._seen = mode, {}
        self._sumsq.zero_()
        try:
            return closure()
        finally:
            self.mode = "update"
            for p in self.params.values():  # unused parameters: nothing to keep
                p.grad = None

    def _clip_coef(self, norm: float) -> float:
        self.last_grad_norm = norm
        if self.max_grad_norm is None:
            return 1.0
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    def _global_norm(self) -> float:
        total = self._sumsq.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        return float(total.sqrt())


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class InBackward(torch.optim.Optimizer):
    """A single-process optimizer over :class:`FusedBackward`: ``loss.backward()`` alone
    updates the weights, each by ``rule`` (any of :data:`RULES`; ``options`` are its
    betas and eps). With global-norm clipping or loss scaling, call ``step(closure)``
    with a closure that runs forward and backward (scaling the loss by ``loss_scale``);
    without them ``step()`` has nothing left to do."""

    rule = "lomo"

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None,
                 clip_mode: str = "two-pass", clip_value: float | None = None,
                 loss_scaler: LossScaler | None = None, stochastic_rounding: bool = False,
                 accumulation_steps: int = 1, rule: str | None = None, **options) -> None:
        params = list(params)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **options))
        self.rule = rule or self.rule
        self.engine = FusedBackward(
            ((str(i), p) for i, p in enumerate(params)), self.rule, lr, weight_decay,
            max_grad_norm=max_grad_norm, clip_mode=clip_mode, clip_value=clip_value,
            loss_scaler=loss_scaler, stochastic_rounding=stochastic_rounding, options=options)
        self.engine.hyper = self.param_groups[0]  # schedulers set lr there
        self.engine.accumulations = accumulation_steps  # update on the last micro-batch
        self.engine.attach()

    @property
    def loss_scale(self) -> float:
        return self.engine.loss_scale

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.engine.hyper = self.param_groups[0]  # torch made new group dicts

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None:
            if self.engine.max_grad_norm is not None or self.engine.loss_scaler is not None:
                raise CollieError(f"{type(self).__name__} with global-norm clipping or "
                                  "loss scaling runs backward twice: call step(closure) with "
                                  "a closure that runs forward and backward")
            self.engine.step_count += 1
            result = None
        else:
            result = self.engine.step(closure)
        # torch's view of the states (state_dict, memory trackers): the engine's, by tensor
        for name, p in self.engine.params.items():
            if name in self.engine.state:
                self.state[p] = self.engine.state[name]
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # gradients are freed as they are used

    def remove_hooks(self) -> None:
        self.engine.detach()


class LOMO(InBackward):
    """LOMO: SGD fused into backward, no state."""

    rule = "lomo"


class AdaLomo(InBackward):
    """AdaLomo: a factored second moment and grouped update normalisation, fused into
    backward."""

    rule = "adalomo"
