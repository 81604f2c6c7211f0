"""Prompt tuning, P-tuning and prefix tuning: trained virtual tokens before every
sequence, as embeddings (the first two) or as every attention's keys and values.

peft's ``PeftModelForCausalLM`` embeds the input ids, puts the prompt encoder's ``v``
virtual tokens before them, runs the model on those embeddings (positions 0 … v + s - 1,
no mask but the causal one) and labels the virtual positions -100. The model captured
here does the same with peft's own prompt modules (``PromptEmbedding``, ``PromptEncoder``:
composed, not patched), so its graph goes through every pass like any other, and returns
the logits at positions v - 1 … v + s - 2: position v - 1 + j predicts token j, the
first one included. The step's targets are then the labels themselves, unshifted, which
is peft's loss: every real token counts, the first predicted from the last virtual one.

Prefix tuning: peft hands the model its ``PrefixEncoder``'s output as a KV cache of
``v`` positions, so every layer's attention reads ``v`` virtual keys and values (not
rotated, as cached keys are not) before the sequence's, under the causal mask of a
sequence that starts at position ``v``. The captured model (:class:`PrefixedModel`)
does exactly that: it fills transformers' own ``DynamicCache`` from peft's encoder, and
export records the cache's concatenations and the mask, so the passes see plain tensors.
Its logits are the sequence's own, and the loss is the usual shifted one.
"""

from __future__ import annotations

import torch

from collie_compile.errors import CollieError

PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
ENCODER = "prompt_encoder"  # the prompt module's name in the captured model, as in peft
SEED = 0  # the prompt encoder's init, the same on every rank and in a one-process run


def is_prompt_method(config: object | None) -> bool:
    return config is not None and config.peft_type.value in PROMPT_METHODS


def is_prefix(config: object | None) -> bool:
    return config is not None and config.peft_type.value == "PREFIX_TUNING"


def virtual_tokens(config: object | None) -> int:
    """How many positions a method puts before each sequence's input (0: none; prefix
    tuning's go into the attentions' keys instead)."""
    return int(config.num_virtual_tokens) if is_prompt_method(config) and not is_prefix(
        config) else 0


def _encoder_output_saved(config: object) -> bool:
    """Whether peft saves the prompt module's output rather than its table (P-tuning's
    MLP, prefix tuning's projection): such an adapter cannot continue training."""
    return config.peft_type.value == "P_TUNING" or (
        is_prefix(config) and bool(config.prefix_projection))


def make_encoder(config: object, model: torch.nn.Module,
                 init: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """peft's prompt module for ``config``, drawn as peft draws it from seed
    :data:`SEED` (the caller's random state left alone); a prompt tuning adapter's saved
    ``prompt_embeddings`` replace its table. P-tuning saves only its prompts, not its
    encoder, so it cannot continue from a saved adapter (nor can it in peft)."""
    from peft.tuners.p_tuning.model import PromptEncoder
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    if config.num_transformer_submodules not in (None, 1):
        raise CollieError("prompt methods of a decoder-only model have one transformer "
                          "submodule; leave num_transformer_submodules out")
    init_from = str(getattr(getattr(config, "prompt_tuning_init", None), "value", "RANDOM"))
    if init_from != "RANDOM" and not init and model.get_input_embeddings().weight.is_meta:
        raise CollieError(f"prompt_tuning_init={init_from} starts the prompts from the "
                          "model's word embeddings, which are not read yet (a model on the "
                          "meta device); load the model first, or initialise with peft, "
                          "save, and continue (--peft-adapter DIR)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if config.peft_type.value == "P_TUNING":
            encoder = PromptEncoder(config)
        elif is_prefix(config):
            encoder = PrefixEncoder(config)
        else:
            encoder = PromptEmbedding(config, model.get_input_embeddings())
    if init:
        if _encoder_output_saved(config):
            raise CollieError(f"a saved {config.peft_type.value} adapter holds its prompts, "
                              "not the encoder that makes them (peft saves only those), so "
                              "its training cannot go on; start afresh, or continue these "
                              "prompts as prompt tuning (prefix tuning: without "
                              "prefix_projection)")
        table = init["prompt_embeddings"]
        if tuple(table.shape) != tuple(encoder.embedding.weight.shape):
            raise CollieError(f"the adapter's prompt_embeddings are {list(table.shape)}, "
                              f"expected {list(encoder.embedding.weight.shape)}: is it for "
                              "this model?")
        with torch.no_grad():
            encoder.embedding.weight.copy_(table)
    return encoder


class _Wrapped(torch.nn.Module):
    """``model``'s modules under their own names (parameter names stay the model's)
    beside ``encoder`` at ``prompt_encoder``; the model itself kept to call."""

    def __init__(self, model: torch.nn.Module, encoder: torch.nn.Module, method: str) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        if next(model.parameters(recurse=False), None) is not None:
            raise CollieError(f"{type(model).__name__} holds parameters outside its modules; "
                              f"{method} cannot wrap it")
        self.add_module(ENCODER, encoder)
        self.config = model.config
        object.__setattr__(self, "causal_lm", model)  # its modules are ours already

    def set_attn_implementation(self, impl: str) -> None:
        self.causal_lm.set_attn_implementation(impl)


class PromptedModel(_Wrapped):
    """``model`` with ``encoder``'s virtual tokens before its input: forward
    ``input_ids -> logits`` of the real positions, shifted by one as the module docstring
    says."""

    def __init__(self, model: torch.nn.Module, encoder: torch.nn.Module, tokens: int) -> None:
        super().__init__(model, encoder, "prompt methods")
        self.tokens = tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lm = self.causal_lm
        embeds = lm.get_input_embeddings()(input_ids)
        ids = torch.arange(self.tokens, device=input_ids.device).unsqueeze(0)
        prompts = self.prompt_encoder(ids).to(embeds.dtype)
        prompts = prompts.expand(input_ids.shape[0], -1, -1)
        out = lm(inputs_embeds=torch.cat([prompts, embeds], dim=1), use_cache=False)
        return out.logits[:, self.tokens - 1:-1]


class PrefixedModel(_Wrapped):
    """``model`` with ``encoder``'s virtual keys and values before every attention's, as
    peft's prefix tuning hands them over (a KV cache of ``config.num_virtual_tokens``
    positions): forward ``input_ids -> logits``."""

    def __init__(self, model: torch.nn.Module, encoder: torch.nn.Module, config: object
                 ) -> None:
        from transformers import DynamicCache

        layers = DynamicCache(config=model.config).layers
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise CollieError(f"prefix tuning on {model.config.model_type}: its cache holds "
                              "layers other than full attention (sliding windows), which "
                              "peft fills another way; use prompt tuning or LoRA")
        super().__init__(model, encoder, "prefix tuning")
        self.prefix = config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        c, b = self.prefix, input_ids.shape[0]
        v, heads = c.num_virtual_tokens, c.num_attention_heads
        ids = torch.arange(v, device=input_ids.device).unsqueeze(0).expand(b, -1)
        kv = self.prompt_encoder(ids).view(b, v, c.num_layers * 2, heads, c.token_dim // heads)
        cache = DynamicCache(config=self.config)
        for layer, pair in enumerate(kv.permute(2, 0, 3, 1, 4).split(2)):
            cache.update(pair[0], pair[1], layer)
        return self.causal_lm(input_ids=input_ids, past_key_values=cache,
                              use_cache=True).logits


def refuse_prompt_with(router_loss: object | None, position_ids: bool) -> None:
    """Refuse what prompt methods cannot be exact with here: packed documents (peft drops
    position_ids under prompt methods, so its documents would attend to each other) and
    a router loss (its mask would have to cover the virtual tokens)."""
    if position_ids:
        raise CollieError("prompt methods put virtual tokens before each row, which "
                          "documents packed into a row (position_ids) would not all see; "
                          "train one sequence per row (no --separate-documents)")
    if router_loss is not None:
        raise CollieError("prompt methods with the routers' load-balancing loss "
                          "(output_router_logits) are not built; turn the loss off or "
                          "use LoRA")


def refuse_prefix_past_positions(config: object, model_config: object, seq_len: int
                                 ) -> None:
    """Refuse a prefix whose sequence would run past the model's positions: after the
    cache of ``num_virtual_tokens``, the sequence's positions start there."""
    most = getattr(model_config, "max_position_embeddings", None)
    v = int(config.num_virtual_tokens)
    if most is not None and seq_len + v > most:
        raise CollieError(f"prefix tuning puts the sequence after {v} virtual positions: "
                          f"seq_len {seq_len} + {v} runs past the model's {most} positions; "
                          f"use seq_len <= {most - v}")


def train_prompts_only(gm: torch.fx.GraphModule, start: dict[str, torch.Tensor]
                       ) -> torch.fx.GraphModule:
    """Freeze every weight of the captured model but the prompt module's, which starts at
    ``start`` (by its own names; the capture of a model on the meta device saw them
    there, and a checkpoint of the base has no copy of them)."""
    for name, p in list(gm.named_parameters()):
        if name.startswith(f"{ENCODER}."):
            owner, _, leaf = name.rpartition(".")
            value = start[name.removeprefix(f"{ENCODER}.")]
            setattr(gm.get_submodule(owner), leaf, torch.nn.Parameter(value.clone()))
        else:
            p.requires_grad_(False)
    return gm


def saved_prompts(weights: dict[str, torch.Tensor], config: object,
                  model: torch.nn.Module | None = None) -> torch.Tensor:
    """The prompts peft saves (``prompt_embeddings``) from the trained prompt module's
    whole ``weights`` (by their names under :data:`ENCODER`): the table itself for prompt
    tuning and prefix tuning, the encoder's output for P-tuning and a prefix's
    projection."""
    table = weights[f"{ENCODER}.embedding.weight"]
    if not _encoder_output_saved(config):
        return table.detach().clone()
    from peft.tuners.p_tuning.model import PromptEncoder
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    encoder = (PrefixEncoder if is_prefix(config) else PromptEncoder)(config).to(table.dtype)
    encoder.load_state_dict({k.removeprefix(f"{ENCODER}."): v for k, v in weights.items()
                             if k.startswith(f"{ENCODER}.")})
    with torch.no_grad():
        return encoder(torch.arange(config.num_virtual_tokens).unsqueeze(0))[0].clone()
