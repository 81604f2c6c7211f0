"""The runtime's options beyond the plan, checked: in-backward updates (clipping, loss
scaling, rounding), LoRA from parallelize's arguments or a saved adapter, the dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from collie_compile.config import LoraRequest
from collie_compile.dtypes import dtype_name, torch_dtype
from collie_compile.errors import CollieError
from collie_compile.layout import DEFAULT_LORA_TARGETS, canonical_lora_targets
from collie_compile.models.prompts import PROMPT_METHODS, is_prompt_method
from collie_compile.optim.in_backward import LossScaler
from collie_compile.optim.specs import CLIP_MODES, get_optimizer


@dataclass(frozen=True)
class FusedOptions:
    """Clipping, loss scaling and rounding: ``parallelize``'s arguments, checked."""

    max_grad_norm: float | None = None
    clip_mode: str = "two-pass"
    clip_value: float | None = None
    loss_scale: str | float | None = None
    stochastic_rounding: bool = False

    def in_backward_only(self) -> list[str]:
        """The options given that only an update inside backward applies."""
        return [k for k, v in (("clip_value", self.clip_value), ("loss_scale", self.loss_scale),
                               ("stochastic_rounding", self.stochastic_rounding),
                               ("clip_mode", self.clip_mode != "two-pass")) if v]

    def check(self, optimizer: str, in_backward: bool | None = None) -> None:
        """Refuse bad values, and options the update's place (``in_backward``; None:
        not decided yet) cannot apply."""
        spec = get_optimizer(optimizer)  # raises for unknown names
        fused = spec.fused_backward or bool(in_backward)
        if self.clip_mode not in CLIP_MODES:
            raise CollieError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got "
                              f"{self.clip_mode!r}")
        if self.loss_scale is not None and self.loss_scale != "dynamic" and not (
                isinstance(self.loss_scale, (int, float)) and self.loss_scale > 0):
            raise CollieError(f"loss_scale must be 'dynamic' or a positive number, got "
                              f"{self.loss_scale!r}")
        extras = self.in_backward_only()
        if fused or not extras or (in_backward is None and spec.in_backward_rule):
            return
        how = (" updating after backward: pass update_in_backward=True (--update-in-backward)"
               if spec.in_backward_rule else "")
        raise CollieError(f"{', '.join(extras)} applies to updates inside backward (lomo, "
                          f"adalomo; lion, adamw, adam, adan with update_in_backward), not "
                          f"to {optimizer!r}{how}")

    def scaler(self) -> LossScaler | None:
        if self.loss_scale is None:
            return None
        if self.loss_scale == "dynamic":
            return LossScaler()
        # a fixed scale: an overflow still skips the step, the scale stays
        return LossScaler(scale=float(self.loss_scale), growth_interval=2**62, backoff=1.0)


def lora_config(config: object | None, rank: int | None, alpha: float | None,
                targets: list[str] | None, dropout: float, peft: object | None = None
                ) -> object | None:
    """The peft config a run trains (None: the whole model), from ``parallelize``'s
    arguments: ``peft=`` (any supported peft config), ``lora=`` (a ``LoraConfig``) or
    the ``lora_*`` shortcuts; checked by :func:`check_peft`."""
    given = [k for k, v in (("peft", peft), ("lora", config),
                            ("lora_rank/lora_targets", rank or targets)) if v is not None]
    if len(given) > 1:
        raise CollieError(f"give the adapters once: {' and '.join(given)} were both given")
    if peft is not None or config is not None:
        return check_peft(peft if peft is not None else config, fresh=True)
    LoraRequest(rank, alpha, None if targets is None else tuple(targets), dropout)  # checks
    if rank is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                      target_modules=targets or list(DEFAULT_LORA_TARGETS),
                      lora_dropout=dropout)


# peft methods built as passes, by peft_type
PEFT_METHODS = ("LORA", "ADALORA", "IA3", *PROMPT_METHODS)


def check_peft(config: object, fresh: bool) -> object:
    """``config`` if the passes build it exactly as peft trains it, else a refusal that
    names why. ``fresh``: its adapters start from peft's init here (not from a saved
    adapter), so only inits this project draws itself are allowed."""
    kind = str(getattr(getattr(config, "peft_type", None), "value", config.__class__.__name__))
    if kind not in PEFT_METHODS:
        raise CollieError(f"peft method {kind} is not supported; the methods are "
                          f"{', '.join(PEFT_METHODS)} (LoRA with use_dora, use_rslora)")
    encoder = getattr(config, "encoder_reparameterization_type", "MLP")
    if kind == "P_TUNING" and str(getattr(encoder, "value", encoder)) != "MLP":
        raise CollieError("P-tuning with an LSTM encoder is not built (its recurrence is "
                          "not captured yet); use the MLP encoder (peft's default)")
    if kind == "ADALORA" and not (config.total_step or 0) > 0:
        raise CollieError("AdaLoRA's budget schedule needs total_step, the number of "
                          "optimizer steps of the run; set it in the AdaLoraConfig "
                          "(train fills it in from --steps)")
    if kind == "ADALORA" and config.rank_pattern:
        raise CollieError("this AdaLoRA adapter's ranks were already allocated "
                          "(rank_pattern); continuing it is not built: give the adapter "
                          "before its allocation, or train it afresh")
    init = getattr(config, "init_lora_weights", True)
    if kind == "LORA" and fresh and init is not True:
        raise CollieError(
            f"init_lora_weights={init!r}: only peft's default init is drawn here; for "
            f"{init}, initialise the adapter with peft (get_peft_model, which also rewrites "
            "the base weights for pissa/olora), save both (save_pretrained), and continue "
            "from them: weights=BASE_DIR, lora_adapter=ADAPTER_DIR (--weights, --peft-adapter)")
    if kind == "IA3" and fresh and not config.init_ia3_weights:
        raise CollieError("init_ia3_weights=False starts IA3 at random scales, which only "
                          "peft draws; initialise with peft, save, and continue from it "
                          "(lora_adapter=DIR)")
    return config


def with_peft_defaults(config: object, model: torch.nn.Module) -> object:
    """A copy of ``config`` with what ``get_peft_model`` fills in for ``model`` filled in:
    default target (and IA3 feed-forward) modules by model type, "all-linear" expanded
    (routers' and experts' parameters too, where peft knows the family). Saved with the
    adapter, so peft reloads exactly the modules trained here."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    config = copy.deepcopy(config)
    kind, model_type = config.peft_type.value, model.config.model_type
    if is_prompt_method(config):  # token_dim, num_layers, heads from the model's config
        from peft.utils.other import _prepare_prompt_learning_config

        config = _prepare_prompt_learning_config(config, model.config)
        config.num_transformer_submodules = 1  # a decoder-only model
        return config
    defaults = {"LORA": [("target_modules", TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)],
                "ADALORA": [("target_modules",
                             TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING)],
                "IA3": [("target_modules", TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
                        ("feedforward_modules",
                         TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING)]}
    if kind == "ADALORA" and config.task_type is None:
        # peft runs AdaLoRA's regulariser only under a task model (a bare PeftModel
        # forwards past it); this is a causal LM, and it is trained with it here
        config.task_type = "CAUSAL_LM"
    for field, mapping in defaults.get(kind, []):
        if getattr(config, field) is None:
            if model_type not in mapping:
                raise CollieError(f"peft has no default {field} for {model_type!r}; give "
                                  f"{field} in the {type(config).__name__}")
            setattr(config, field, set(mapping[model_type]))
    return _maybe_include_all_linear_layers(config, model)


def refuse_what_peft_cannot_adapt(model: torch.nn.Module, config: object) -> None:
    """Refuse LoRA on a targeted ``nn.Linear`` whose own forward returns something else
    than its output tensor (PhiMoE's router returns logits, weights and choices): peft
    adds its branch to that output and fails, so an adapter trained here could not be
    loaded, run or merged by peft."""
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, mod in model.named_modules():
        if (not isinstance(mod, torch.nn.Linear) or type(mod).forward is torch.nn.Linear.forward
                or not check_target_module_exists(config, name)):
            continue
        w = mod.weight
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # jitter draws nothing
            out = mod(torch.zeros(1, mod.in_features, device=w.device, dtype=w.dtype))
        if not isinstance(out, torch.Tensor):
            raise CollieError(f"LoRA on {name} ({type(mod).__name__}): its forward returns "
                              f"a {type(out).__name__}, not the linear's output, which peft "
                              "cannot adapt (its model fails on that forward: the adapter "
                              "could not be used there); leave "
                              f"{name.rpartition('.')[2]} out of the target modules")


def lora_plan_args(config: object | None) -> tuple[int | None, str | list[str] | None]:
    """(rank, targets) of a peft config as the planner prices it: LoRA and DoRA at their
    rank, AdaLoRA at its initial rank (E, one value per rank, is not counted), IA3 as a
    rank-1 LoRA on its targets (an upper bound: one vector per module, of its input or
    output width, where rank 1 counts both); prompt methods as the whole base frozen, no
    adapter on a linear (targets ``[]``)."""
    if config is None:
        return None, None
    if is_prompt_method(config):
        return 1, []
    rank = config.init_r if config.peft_type.value == "ADALORA" else getattr(config, "r", 1)
    return rank, canonical_lora_targets(config.target_modules)


ADAPTER_PREFIX = "base_model.model."


def read_peft_config(path: str | Path, steps: int | None = None) -> object:
    """A peft config from a JSON file (``peft_type`` and the config's fields, as
    ``adapter_config.json`` holds them) or a folder holding ``adapter_config.json``.
    ``steps``: the run's length, AdaLoRA's ``total_step`` where the file leaves it out."""
    import json

    from peft import PeftConfig

    p = Path(path)
    try:
        if p.is_dir():
            return PeftConfig.from_pretrained(str(p))
        fields = json.loads(p.read_text())
        if fields.get("peft_type") == "ADALORA" and fields.get("total_step") is None:
            fields["total_step"] = steps
        return PeftConfig.from_peft_type(**fields)
    except Exception as e:  # a missing file, bad JSON, an unknown type or field
        raise CollieError(f"cannot read a peft config from {p}: {e}; give a JSON file with "
                          'its peft_type and fields, e.g. {"peft_type": "IA3", '
                          '"target_modules": ["k_proj", "v_proj", "down_proj"]}') from None


def read_adapter(directory: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(peft config, adapter tensors by our names) of a saved PEFT adapter."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        kind = PeftConfig.from_pretrained(str(d)).peft_type
        config = PEFT_TYPE_TO_CONFIG_MAPPING[kind].from_pretrained(str(d))
        tensors = load_file(str(d / "adapter_model.safetensors"))
    except Exception as e:  # peft and safetensors raise many types for bad files
        raise CollieError(f"cannot read a PEFT adapter from {d}: {e}; give the directory "
                          "PeftModel.save_pretrained wrote") from None
    config.inference_mode = False  # it trains on here
    return (check_peft(config, fresh=False),
            {k.removeprefix(ADAPTER_PREFIX): v for k, v in tensors.items()})


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
