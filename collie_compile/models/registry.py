"""Model presets and model construction.

A MODEL argument is a preset name (``collie-compile models`` lists them), a local
directory holding a ``config.json``, or the path of such a file. Presets carry the
published Hugging Face configs, so planning needs no download. Models are built on the
meta device unless told otherwise: planning never needs real weights.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from collie_compile.errors import CollieError, first_line
from collie_compile.models.attention import IMPLEMENTATION
from collie_compile.models.presets import PRESETS, config_path
from collie_compile.models.probe import LEADING_LAYERS


def load_config(model: str | PretrainedConfig) -> PretrainedConfig:
    """Resolve a preset name, a directory with config.json, or a config.json path."""
    if isinstance(model, PretrainedConfig):
        return _one_stack(model)
    if model in PRESETS:
        p = PRESETS[model]
        cfg = AutoConfig.for_model(p.model_type, **p.config)
        cfg.name_or_path = model
    else:
        path = config_path(model)
        if path is None:
            raise CollieError(
                f"unknown model {model!r}: not a preset and no config.json there; "
                f"use one of {', '.join(PRESETS)} (see `collie-compile models`) or a local "
                "directory/config.json of a Hugging Face causal LM")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CollieError(f"cannot read model config {path}: {e}; "
                              "give a valid Hugging Face config.json") from None
        if not isinstance(data, dict) or not data.get("model_type"):
            raise CollieError(f"{path} has no 'model_type'; is it a Hugging Face config.json?")
        cfg = config_from_dict(data, str(path.parent))
    cfg.use_cache = False  # training: no KV cache in the captured graph
    return _one_stack(cfg)


def _one_stack(cfg: PretrainedConfig) -> PretrainedConfig:
    """``cfg``, if its model is one stack of decoder blocks (the stack collie-compile
    prices, splits into pipeline stages and shards)."""
    if getattr(cfg, "num_hidden_layers", None) is None:
        raise CollieError(f"{model_name(cfg)}: the {cfg.model_type} config has no "
                          "num_hidden_layers: its model is not one stack of decoder blocks "
                          "(e.g. BLT: byte encoder, global and byte decoder stacks), and "
                          "collie-compile trains a single stack")
    return cfg


def config_from_dict(data: dict[str, Any], name: str) -> PretrainedConfig:
    """A transformers config from its JSON fields (``model_type`` among them)."""
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except ValueError:  # transformers' message lists all its ~400 model types: too long
        raise CollieError(f"{name}: transformers does not know model_type {model_type!r}; "
                          "check the spelling (e.g. llama, mistral, qwen2, gpt2) or upgrade "
                          "transformers") from None
    cfg.name_or_path = name
    cfg.use_cache = False
    return cfg


# Config fields that change neither the weights' shapes nor the computation: where the
# config came from, runtime switches, token ids of the tokenizer
_NOT_ARCHITECTURE = {"name_or_path", "transformers_version", "architectures", "dtype",
                     "torch_dtype", "use_cache", "return_dict", "output_attentions",
                     "output_hidden_states", "id2label", "label2id", "problem_type",
                     "tokenizer_class", "bos_token_id", "eos_token_id", "pad_token_id",
                     "sep_token_id", "decoder_start_token_id"}


def architecture(cfg: PretrainedConfig) -> dict:
    """The config's fields that define the model (what a checkpoint is bound to, rather
    than the path it was loaded from), as JSON values."""
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in _NOT_ARCHITECTURE and not k.startswith("_")}
    return json.loads(json.dumps(fields, default=str, sort_keys=True))


def model_name(cfg: PretrainedConfig) -> str:
    return str(getattr(cfg, "name_or_path", "") or cfg.model_type)


def with_layers(cfg: PretrainedConfig, layers: int) -> PretrainedConfig:
    """A copy of ``cfg`` with ``layers`` decoder blocks (for probing one block cheaply).
    Counts of leading layers of another kind (DeepSeek's first dense layers before its
    MoE ones) are capped below ``layers``, so the probe still holds the later kind."""
    out = cfg.__class__.from_dict(cfg.to_dict())
    out.num_hidden_layers = layers
    for name in LEADING_LAYERS:
        v = getattr(out, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= layers:
            setattr(out, name, max(layers - 1, 0))
    if getattr(out, "layer_types", None) is not None:
        out.layer_types = list(cfg.layer_types)[:layers]
    out.name_or_path = cfg.name_or_path
    out.use_cache = False
    return out


# Attention implementations to build a model with, best first: ours (SDPA told the mask
# is causal), the family's own SDPA path, then its eager attention (the only one some
# families have: ALiBi biases, logit soft-capping, attention classes of their own).
ATTENTION_FALLBACKS = (IMPLEMENTATION, "sdpa", "eager")


def build_model(cfg: PretrainedConfig, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Instantiate the causal LM for ``cfg`` (on the meta device: no memory, no init cost),
    with the first attention implementation of :data:`ATTENTION_FALLBACKS` it supports."""
    errors = []
    for impl in ATTENTION_FALLBACKS:
        try:
            with torch.device(device):
                return AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                        attn_implementation=impl)
        except (ValueError, KeyError, ImportError) as e:
            # transformers says "does not support ... scaled_dot_product_attention"
            # (ValueError) or, in families with their own class table, KeyError
            errors.append(f"{impl}: {first_line(e)}")
        except Exception as e:  # a config the family's constructor rejects
            raise CollieError(f"{model_name(cfg)}: transformers cannot build this "
                              f"{cfg.model_type} model ({first_line(e)}); check its "
                              "config") from None
    raise CollieError(f"{model_name(cfg)}: not a causal LM transformers can build "
                      f"({'; '.join(errors)})")


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Every name of a parameter that has several (tied input/output embeddings) mapped
    to its first name, the one Hugging Face checkpoints store."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        out[name] = canonical
    counts: dict[str, int] = {}
    for canonical in out.values():
        counts[canonical] = counts.get(canonical, 0) + 1
    return {n: c for n, c in out.items() if counts[c] > 1}


def count_params(model: torch.nn.Module) -> int:
    """Parameters as HF counts them: tied weights once."""
    return sum(p.numel() for p in model.parameters())
