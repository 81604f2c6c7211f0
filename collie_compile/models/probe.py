"""Shrink any causal-LM config to a cheap CPU probe, and sort model families by kind.

:func:`probe_config` keeps what makes a family itself (the head layout and its GQA ratio,
the kinds of layer it mixes, MoE routing, sliding windows, the rotary fraction) and shrinks
what only costs time: depth, widths, vocabulary, expert counts, windows and positions. It
works on the config's own field names (``config.to_dict()`` read through ``attribute_map``)
by generic rules on the field names, so a family nobody listed still shrinks; the few
families whose fields no rule can read sit in ``_FAMILY_FIXUPS`` with the reason.

:func:`family_kind` sorts a ``model_type`` into decoder / moe / ssm / hybrid /
encoder-decoder / encoder / multimodal / other from the config, the causal-LM class and the
module classes a tiny meta-device copy of the model is built from.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

__all__ = ["KINDS", "attention_heads", "causal_lm_class", "causal_lm_families", "family_kind",
           "probe_config"]

KINDS = ("decoder", "moe", "ssm", "hybrid", "encoder-decoder", "encoder", "multimodal", "other")

EXPERTS = 4  # experts per MoE layer in a probe
TOP_K = 2  # at most this many experts per token
WINDOW = 8  # sliding windows, attention chunks, SSM chunks: below the test length 16
MIN_POSITIONS, MAX_POSITIONS = 64, 256
MAX_RANK = 16  # low-rank projections (MLA q/kv, LoRA-like gates, dt ranks)
MAX_STATE = 16  # SSM state size

# Semantic names tried in order; each is read through the config's attribute_map first.
_LAYER_NAMES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
                "num_decoder_layers", "num_blocks")
_EXTRA_LAYER_COUNTS = {"encoder_layers", "num_encoder_layers", "decoder_layers",
                       "num_decoder_layers", "num_blocks"}
_HIDDEN_NAMES = ("hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "dim")
_HEAD_NAMES = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
               "decoder_attention_heads", "encoder_attention_heads",
               "num_encoder_attention_heads", "num_decoder_attention_heads")
_KV_NAMES = ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "num_query_groups")
_HEAD_DIM_NAMES = ("head_dim", "d_head", "dim_head", "attention_head_size", "kv_channels",
                   "attention_head_dim", "d_kv")
_VOCAB_NAMES = ("vocab_size",)
_POSITION_NAMES = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                   "max_target_positions", "model_max_length", "context_length",
                   "max_sequence_length", "max_seq_length"}
# layer counts/indices that must stay inside the kept stack (first k dense layers, ...)
# counts of leading layers of another kind (dense before MoE, full before sliding)
LEADING_LAYERS = {"first_k_dense_replace", "num_dense_layers", "moe_layer_start_index",
                   "max_window_layers", "loop_layer_index_start",
                   "moe_layer_end_index", "loop_layer_index_end"}
_MTP_LAYERS = {"num_nextn_predict_layers", "num_mtp_layers"}
# layers that reuse an earlier layer's KV cache need an earlier layer of their own kind, which
# a stack of a few layers (one of each kind) does not have
_DROPPED = {"num_kv_shared_layers": 0}
_NOT_SHRUNK = {"model_type", "architectures", "transformers_version", "id2label", "label2id",
               "_name_or_path", "dtype", "rope_parameters", "rope_scaling", "problem_type",
               "chunk_size_feed_forward", "per_layer_config", "quantization_config"}

_TOKEN = re.compile(r"(^|_)(token_id|token_ids|token_index|tokens)$|^(bos|eos|pad|unk|mask|sep|cls)"
                    r"_index$")
_PERIOD = re.compile(r"(_period|pattern|_interval|_step|every_n_layers|group_size|layers_per_\w+"
                     r"|per_attn_res_block)$")
_OFFSET = re.compile(r"layer_offset$")
_HEADS = re.compile(r"heads|^num_query_groups$")
_HEAD_DIM = re.compile(r"head_?dim|head_size|d_head$|^dim_head$|^d_kv$|kv_channels|rotary_dim$")
_EXPERTS = re.compile(r"^(num|n|moe_num)_(local_|routed_)?experts$|^zero_expert_num$")
_TOP_K = re.compile(r"experts_per_tok(en)?$|^moe_k$|^moe_top_?k$|^top_k_experts$"
                    r"|^num_selected_experts$")
_SHARED_EXPERTS = re.compile(r"^(n|num|moe_num)_shared_experts?$")
_EXPERT_GROUPS = re.compile(r"^(n_group|num_expert_group)$")
_MLP = re.compile(r"intermediate|ffn|^d_ff$|^dim_ff$|^dff$|^d_inner$|feed_forward_size|^n_inner$"
                  r"|expert_hidden")
_WIDTH = re.compile(r"hidden_size|embd|embed_dim|embedding_dim|embedding_size|^d_model$"
                    r"|^emb_dim$|width|proj_dim|d_ssm|hidden_dim")
# equal to a hidden size: the width of the model (or of a sibling sub-config)
_LINKED_WIDTH = re.compile(r"hidden_size|_dim$|width|embd|d_model|input_size|output_size")
_NOT_WIDTH = re.compile(r"conv|kernel|filter|multiple|factor|multiplier|indices|ratio")
_RANK = re.compile(r"(_rank|lowrank)$")
_STATE = re.compile(r"(^|_)(state_size|d_state)$")
_SSM_GROUPS = re.compile(r"^(n_groups|mamba_n_groups|mamba_ngroups)$")
_WINDOW = re.compile(r"window|chunk|^block_size$|^index_block_size$|index_topk|^local_attention$")
_NOT_WINDOW = re.compile(r"feed_forward|audio|^use_|layers|num_chunks|chunks_(before|after)")
_DROPOUT = re.compile(r"dropout|pdrop|drop_prob|layerdrop|drop_path|jitter")
_INDEX_LIST = re.compile(r"(layers|layer_ids|layer_idxs|_idxs|layer_indices)$")
_PATTERN_LIST = re.compile(r"(types|pattern)$")


@dataclass
class _Tokens:
    """Special-token ids outside the new vocabulary, moved (consistently) to its top end."""

    vocab: int
    used: set[int]
    moved: dict[int, int] = field(default_factory=dict)

    def __call__(self, tid: Any) -> Any:
        if isinstance(tid, list):
            return [self(t) for t in tid]
        if not isinstance(tid, int) or isinstance(tid, bool) or 0 <= tid < self.vocab:
            return tid
        if tid < 0:  # -1 = "none" in some configs: keep the convention
            return tid
        if tid not in self.moved:
            new = self.vocab - 1
            while new in self.used or new in self.moved.values():
                new -= 1
            if new < 0:
                raise ValueError(f"vocab={self.vocab} is too small for the special tokens")
            self.moved[tid] = new
        return self.moved[tid]


@dataclass
class _Scope:
    """Old and new sizes of one config (a top-level config or one of its sub-configs)."""

    layers: int
    old_layers: int | None
    keep: list[int]  # indices of the kept layers in the old stack
    heads: int | None
    old_heads: int | None
    kv: int | None
    old_kv: int | None
    head_dim: int
    old_head_dim: int | None
    hidden: int | None
    old_hidden: int | None
    vocab: int
    old_vocab: int | None
    mlp_scale: float
    keys: dict[str, str | None]  # semantic name -> stored key
    no_dropout: bool
    tokens: _Tokens

    @property
    def head_scale(self) -> float:
        return self.heads / self.old_heads if self.heads and self.old_heads else 1.0

    @property
    def dim_scale(self) -> float:
        return self.head_dim / self.old_head_dim if self.old_head_dim else 1.0

    @property
    def width_scale(self) -> float:
        return self.hidden / self.old_hidden if self.hidden and self.old_hidden else 1.0


def _key(cfg_dict: dict[str, Any], amap: dict[str, str], names: Iterable[str]) -> str | None:
    """The stored key of the first of ``names`` the config sets (read through attribute_map)."""
    for name in names:
        key = amap.get(name, name)
        value = cfg_dict.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key
    return None


def _int(d: dict[str, Any], key: str | None) -> int | None:
    return d[key] if key is not None else None


def attention_heads(cfg: PretrainedConfig) -> tuple[int | None, int | None]:
    """(query heads, key/value heads) of ``cfg``; ``(None, None)`` for attention-free models."""
    d, amap = cfg.to_dict(), dict(getattr(cfg, "attribute_map", {}) or {})
    heads = _int(d, _key(d, amap, _HEAD_NAMES))
    if heads is None:
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        if text is not cfg:
            return attention_heads(text)
        return None, None
    kv = _int(d, _key(d, amap, _KV_NAMES))
    if d.get("multi_query") and not d.get("new_decoder_architecture"):
        kv = 1
    return heads, kv if kv else heads


def _round(x: float, multiple: int = 1, floor: int = 1) -> int:
    return max(floor, multiple * round(x / multiple))


def _round_up(x: float, multiple: int = 8) -> int:
    return max(multiple, multiple * math.ceil(x / multiple - 1e-9))


def _kept_layers(n_old: int, layers: int, kinds: list[tuple[Any, ...]]) -> list[int]:
    """``layers`` indices of the old stack: the first layer of each kind, then the earliest."""
    if layers >= n_old:
        return [i % n_old for i in range(layers)]
    keep: list[int] = []
    seen: set[Any] = set()
    for i, kind in enumerate(kinds):
        if kind not in seen and len(keep) < layers:
            seen.add(kind)
            keep.append(i)
    for i in range(n_old):
        if len(keep) >= layers:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _cover(pattern: list[Any], n: int) -> list[Any]:
    """``n`` entries of a repeating pattern that still hold each of its kinds (if n allows)."""
    keep = _kept_layers(len(pattern), n, [(_hashable(p),) for p in pattern])
    return [pattern[i] for i in keep]


def _hashable(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _index_list(name: str, value: Any, n_old: int) -> bool:
    """A list of layer indices (``mlp_only_layers=[0, 1]``, ``moe_layers=[0, ..., n-1]``)."""
    if not (_INDEX_LIST.search(name) and isinstance(value, list) and value):
        return False
    if not all(_is_int(v) and 0 <= v < n_old for v in value):
        return False
    return len(value) != n_old or sorted(value) == list(range(n_old))


def _per_layer_list(name: str, value: Any, n_old: int | None) -> bool:
    return (n_old is not None and n_old > 1 and isinstance(value, list) and len(value) == n_old
            and not _TOKEN.search(name) and not _index_list(name, value, n_old))


def _scope(cfg: PretrainedConfig, d: dict[str, Any], args: dict[str, Any], tokens: _Tokens,
           parent: _Scope | None) -> _Scope:
    amap = dict(getattr(cfg, "attribute_map", {}) or {})
    keys = {
        "layers": _key(d, amap, _LAYER_NAMES),
        "hidden": _key(d, amap, _HIDDEN_NAMES),
        "heads": _key(d, amap, _HEAD_NAMES),
        "kv": _key(d, amap, _KV_NAMES),
        "head_dim": _key(d, amap, _HEAD_DIM_NAMES),
        "vocab": _key(d, amap, _VOCAB_NAMES),
        "positions": _key(d, amap, ["max_position_embeddings"]),
        "mlp": _key(d, amap, ["intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size",
                              "decoder_ffn_dim", "d_ff", "dim_ff", "dff", "d_inner"]),
    }
    old_layers = _int(d, keys["layers"])
    old_hidden = _int(d, keys["hidden"])
    old_heads = _int(d, keys["heads"])
    old_kv = _int(d, keys["kv"]) or old_heads
    if d.get("multi_query") and not d.get("new_decoder_architecture"):
        old_kv = 1
    old_head_dim = _int(d, keys["head_dim"])
    if old_head_dim is None and old_hidden and old_heads:
        old_head_dim = old_hidden // old_heads

    layers = args["layers"]
    head_dim = args["head_dim"]
    if old_heads is not None:
        heads = args["heads"] or old_heads
        if args["kv_heads"] and heads % args["kv_heads"]:
            raise ValueError(f"{heads} heads are not a multiple of kv_heads={args['kv_heads']}")
        kv = args["kv_heads"] or max(1, heads * (old_kv or old_heads) // old_heads)
        if old_kv == old_heads and args["kv_heads"] is None:
            kv = heads
        if d.get("kv_lora_rank") and old_kv == old_heads:
            kv = heads  # latent attention (MLA) expands K/V to every query head: no groups
        while heads % kv:
            kv -= 1
        hidden: int | None = heads * head_dim
    elif parent is not None and old_hidden is not None:
        # a part of a model (dbrx's ffn_config, a sub-block) shrinks by its parent's factors
        heads = kv = None
        hidden = _round(old_hidden * parent.width_scale, 2)
        head_dim, old_head_dim = parent.head_dim, parent.old_head_dim
    else:
        heads = kv = None
        hidden = (args["heads"] or 4) * head_dim if old_hidden is not None else None

    old_mlp = _int(d, keys["mlp"])
    if args["intermediate"] and old_mlp:
        mlp_scale = args["intermediate"] / old_mlp
    elif hidden and old_hidden:
        mlp_scale = hidden / old_hidden
    else:
        mlp_scale = parent.mlp_scale if parent else 1.0

    old_vocab = _int(d, keys["vocab"])
    kinds: list[tuple[Any, ...]] = []
    if old_layers:
        lists = [v for k, v in d.items()
                 if k not in _NOT_SHRUNK and _per_layer_list(k, v, old_layers)]
        members = [set(v) for k, v in d.items() if _index_list(k, v, old_layers)]
        kinds = [tuple(_hashable(lst[i]) for lst in lists) + tuple(i in m for m in members)
                 for i in range(old_layers)]
        plc = d.get("per_layer_config")
        if isinstance(plc, dict):
            kinds = [kind + (_hashable(plc.get(f"{i:02d}", plc.get(str(i)))),)
                     for i, kind in enumerate(kinds)]
    keep = _kept_layers(old_layers, layers, kinds) if old_layers else list(range(layers))
    return _Scope(layers=layers, old_layers=old_layers, keep=keep, heads=heads,
                  old_heads=old_heads, kv=kv, old_kv=old_kv, head_dim=head_dim,
                  old_head_dim=old_head_dim, hidden=hidden, old_hidden=old_hidden,
                  vocab=args["vocab"], old_vocab=old_vocab, mlp_scale=mlp_scale, keys=keys,
                  no_dropout=args["no_dropout"], tokens=tokens)


def _heads_value(name: str, v: int, s: _Scope) -> int:
    if name == s.keys["heads"] or name in _HEAD_NAMES:
        return s.heads if s.heads is not None else _round(v * s.head_scale)
    if name == s.keys["kv"] or name in _KV_NAMES:
        return s.kv if s.kv is not None else _round(v * s.head_scale)
    if ("key_value" in name or "kv" in name) and s.old_kv and s.kv:
        return _round(v * s.kv / s.old_kv)
    return _round(v * s.head_scale)


def _shrink_value(name: str, v: Any, s: _Scope, done: dict[str, Any]) -> Any:
    """The probe value of field ``name`` (old value ``v``); ``done``: fields already set."""
    if name in _NOT_SHRUNK or v is None or isinstance(v, str | dict):
        return v
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return 0.0 if s.no_dropout and _DROPOUT.search(name) else v
    if _TOKEN.search(name):
        return s.tokens(v)
    if not _is_int(v):
        return v
    layers = s.layers
    if name in _DROPPED:
        return _DROPPED[name]
    if name == s.keys["vocab"] or "vocab" in name:
        return s.vocab if name == s.keys["vocab"] or v == s.old_vocab else min(v, s.vocab)
    if name == s.keys["layers"] or name in _EXTRA_LAYER_COUNTS:
        return layers if v > 0 else v
    if _PERIOD.search(name):
        return max(1, min(v, layers))
    if _OFFSET.search(name):
        period = done.get(name.replace("offset", "period"), layers)
        return v % max(1, period)
    if name in LEADING_LAYERS:
        return min(v, max(layers - 1, 0))
    if name in _MTP_LAYERS:
        return min(v, 1)
    if name == s.keys["positions"] or name in _POSITION_NAMES:
        return max(MIN_POSITIONS, min(v, MAX_POSITIONS))
    if _HEADS.search(name) or name in (s.keys["heads"], s.keys["kv"]) or name in _HEAD_NAMES:
        return _heads_value(name, v, s)
    if _HEAD_DIM.search(name) or name == s.keys["head_dim"]:
        if name == s.keys["head_dim"]:
            return s.head_dim
        new = _round(v * s.dim_scale, 2, 2)
        return min(new, s.head_dim) if name.endswith("rotary_dim") else new
    if _EXPERTS.search(name):
        return min(v, EXPERTS)
    if _TOP_K.search(name):
        return min(v, TOP_K)
    if _SHARED_EXPERTS.search(name):
        return min(v, 1)
    if _EXPERT_GROUPS.search(name):
        experts = next((done[k] for k in done if _EXPERTS.search(k) and _is_int(done[k])), None)
        groups = min(v, 2)
        while experts and experts % groups:
            groups -= 1
        return groups
    if name == "topk_group":
        return min(v, next((done[k] for k in done if _EXPERT_GROUPS.search(k)), v))
    if _LINKED_WIDTH.search(name) and v == s.old_hidden and s.hidden:
        return s.hidden  # an adapter's input, a projection's output: the model's width
    if _MLP.search(name) and not _NOT_WIDTH.search(name):
        return _round_up(v * s.mlp_scale, 8)
    if _WIDTH.search(name) and not _NOT_WIDTH.search(name):
        if name == s.keys["hidden"] or (v == s.old_hidden and s.hidden):
            return s.hidden
        return _round(v * s.width_scale, 2, 2)
    if _RANK.search(name):
        return min(v, MAX_RANK)
    if _STATE.search(name):
        return min(v, MAX_STATE)
    if _SSM_GROUPS.search(name):
        return min(v, 2)
    if _WINDOW.search(name) and not _NOT_WINDOW.search(name):
        return min(v, WINDOW) if v > 0 else v
    return v


def _shrink_lists(d: dict[str, Any], s: _Scope) -> None:
    """Per-layer lists keep the chosen layers; layer-index lists are renumbered."""
    n_old = s.old_layers
    if not n_old:
        return
    for name, value in list(d.items()):
        if name in _NOT_SHRUNK:
            continue
        if _per_layer_list(name, value, n_old):
            d[name] = [_shrink_value(name, value[i], s, d) for i in s.keep]
        elif _index_list(name, value, n_old):
            wanted = set(value)
            d[name] = [new for new, old in enumerate(s.keep) if old in wanted]
        elif (isinstance(value, list) and _PATTERN_LIST.search(name) and value
              and s.layers < len(value) < n_old and all(isinstance(x, str) for x in value)):
            d[name] = _cover(value, s.layers)  # a repeating pattern: keep one of each kind
    plc = d.get("per_layer_config")
    if isinstance(plc, dict) and plc:
        width = max(len(k) for k in plc)
        new_plc = {}
        for new, old in enumerate(s.keep):
            entry = plc.get(f"{old:0{width}d}", plc.get(str(old)))
            if isinstance(entry, dict):
                done: dict[str, Any] = {}
                for k, v in entry.items():
                    done[k] = _shrink_value(k, v, s, done)
                new_plc[f"{new:0{width}d}"] = done
        d["per_layer_config"] = new_plc


# --- families no generic rule can read ---------------------------------------------------
# Each entry says why; it runs after the generic rules on the config dict.

def _fix_dory(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # to_dict() writes each layer as an (attention, "mlp") block pair and doubles the layer
    # counts; the stack is input + recurrent (looped) + output layers: keep one recurrent
    kinds = old["layer_types"][::2]
    n = s.layers
    types = _cover(kinds, n) if n < len(kinds) else [kinds[i % len(kinds)] for i in range(n)]
    d["layer_types"] = [block for kind in types for block in (kind, "mlp")]
    recurrent = 1 if n < 3 else n - 2
    inputs = min(1, n - recurrent)
    d["num_hidden_layers"] = 2 * n
    d["n_recurrent_layers"] = 2 * recurrent
    d["n_input_layers"] = 2 * inputs
    d["n_output_layers"] = 2 * (n - recurrent - inputs)


def _fix_falcon_h1(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # mamba_n_heads * mamba_d_head must equal the Mamba width (mamba_d_ssm or expand * hidden)
    width = d["mamba_d_ssm"] or d["mamba_expand"] * d["hidden_size"]
    d["mamba_n_heads"] = max(1, width // d["mamba_d_head"])
    d["mamba_d_head"] = width // d["mamba_n_heads"]


def _fix_gpt_neo(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # __post_init__ rebuilds attention_layers from the run-length attention_types and wants
    # one entry per layer
    d["attention_types"] = [[[t], 1] for t in d["attention_layers"]]


def _fix_inkling2_loop(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # the looped span [start, end) must align with attention-residual blocks: blocks of one
    # layer, the last layer looped
    n = d["num_hidden_layers"]
    d["n_layers_per_attn_res_block"] = 1
    d["loop_layer_index_start"], d["loop_layer_index_end"] = max(n - 1, 0), n


def _fix_mamba2(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # Mamba2 has no attention: its num_heads * head_dim must equal expand * hidden_size
    d["hidden_size"] = d["num_heads"] * d["head_dim"] // d.get("expand", 2)
    d["n_groups"] = math.gcd(d["n_groups"], d["num_heads"])


def _fix_reformer(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # axial position embeddings: the widths add up to hidden_size and the shape multiplies to
    # the max length (in training, to the sequence length itself: probe it at 64 tokens)
    d["axial_pos_shape"] = [WINDOW, MIN_POSITIONS // WINDOW]
    d["max_position_embeddings"] = MIN_POSITIONS
    d["axial_pos_embds_dim"] = [d["hidden_size"] // 4, d["hidden_size"] - d["hidden_size"] // 4]


def _fix_zamba(d: dict[str, Any], old: dict[str, Any], s: _Scope) -> None:
    # attention runs on [hidden, embeddings] concatenated: heads * head_dim = 2 * hidden_size;
    # Zamba2's mamba heads split expand * hidden_size
    d["hidden_size"] = s.heads * s.head_dim // 2
    d["attention_hidden_size"] = s.heads * s.head_dim
    d["attention_head_dim"] = s.head_dim
    if "mamba_headdim" in d:
        d["mamba_headdim"] = d["mamba_expand"] * d["hidden_size"] // d["n_mamba_heads"]
    if d["model_type"] == "zamba" and d["num_hidden_layers"] >= 2:
        # the shared transformer is tied across hybrid layers: a stack needs two of them
        d["layers_block_type"] = ["hybrid"] * d["num_hidden_layers"]


# (new dict, old dict, scope)
_FAMILY_FIXUPS: dict[str, Callable[[dict[str, Any], dict[str, Any], _Scope], None]] = {
    "dory": _fix_dory,
    "falcon_h1": _fix_falcon_h1,
    "gpt_neo": _fix_gpt_neo,
    "inkling2_loop_text": _fix_inkling2_loop,
    "mamba2": _fix_mamba2,
    "reformer": _fix_reformer,
    "zamba": _fix_zamba,
    "zamba2": _fix_zamba,
}


def _sub_configs(cfg: PretrainedConfig, d: dict[str, Any]) -> list[str]:
    """Fields of ``cfg`` that hold configs of their own (``text_config``, ``vision_config``)."""
    subs = []
    for name, value in d.items():
        if isinstance(value, dict) and name not in _NOT_SHRUNK:
            try:
                if isinstance(getattr(cfg, name), PretrainedConfig):
                    subs.append(name)
            except Exception:  # noqa: BLE001 - per-layer attributes of heterogeneous configs
                continue
    return subs


def _after(name: str) -> int:
    if _OFFSET.search(name):
        return 1
    if _EXPERT_GROUPS.search(name):
        return 2
    return 3 if name == "topk_group" else 0


def _shrink(cfg: PretrainedConfig, args: dict[str, Any], tokens: _Tokens,
            parent: _Scope | None = None) -> tuple[dict[str, Any], _Scope]:
    """The probe's config dict for ``cfg`` and the sizes it was shrunk by."""
    d = cfg.to_dict()
    scope = _scope(cfg, d, args, tokens, parent)
    subs = _sub_configs(cfg, d)
    done: dict[str, Any] = {}
    for name in sorted(d, key=_after):  # fields that read others' new values come last
        if name not in subs:
            done[name] = _shrink_value(name, d[name], scope, done)
    done = {name: done.get(name, d[name]) for name in d}
    sub_scopes = {}
    for name in subs:
        done[name], sub_scopes[name] = _shrink(getattr(cfg, name), args, tokens, scope)
    _link_widths(d, done, sub_scopes)
    _shrink_lists(done, scope)
    for names, value in ((_HEAD_DIM_NAMES, scope.head_dim), (_KV_NAMES, scope.kv)):
        key = next((k for k in names if k in done), None)
        if scope.heads is not None and key and done[key] is None:
            done[key] = value  # "derive it from hidden and heads": say it outright
    fixup = _FAMILY_FIXUPS.get(str(d.get("model_type", "")))
    if fixup is not None:
        fixup(done, d, scope)
    return done, scope


def _link_widths(old: dict[str, Any], new: dict[str, Any], scopes: dict[str, _Scope]) -> None:
    """A sub-config's width that equals a sibling's hidden size (a vision adapter's output, a
    byte encoder's global width) becomes that sibling's new hidden size."""
    for name, scope in scopes.items():
        for other, other_scope in scopes.items():
            old_hidden, hidden = other_scope.old_hidden, other_scope.hidden
            if other == name or not old_hidden or not hidden or old_hidden == scope.old_hidden:
                continue
            for key, value in old[name].items():
                if _LINKED_WIDTH.search(key) and _is_int(value) and value == old_hidden:
                    new[name][key] = hidden


def _token_ids(d: dict[str, Any]) -> Iterable[int]:
    for name, value in d.items():
        if isinstance(value, dict) and name not in _NOT_SHRUNK:
            yield from _token_ids(value)
        elif _TOKEN.search(name):
            for v in value if isinstance(value, list) else [value]:
                if _is_int(v):
                    yield v


def probe_config(cfg: PretrainedConfig, *, layers: int = 2, heads: int | None = None,
                 kv_heads: int | None = None, head_dim: int = 16, vocab: int = 256,
                 intermediate: int | None = None, no_dropout: bool = False) -> PretrainedConfig:
    """A copy of ``cfg`` shrunk for a cheap CPU test (``cfg`` itself is not changed).

    - ``layers`` decoder layers (encoder layers too, for encoder-decoder configs). Per-layer
      lists (``layer_types``, ``mlp_layer_types``, ...) keep the first layer of each kind so a
      hybrid still holds each kind of block when ``layers`` allows; layer-index lists
      (``mlp_only_layers``, ``moe_layers``) are renumbered; periods and "first k dense" counts
      are capped so each kind of layer still appears.
    - ``heads`` query heads (default: the config's own) of width ``head_dim``; key/value heads
      ``kv_heads`` or the config's heads/kv ratio (latent attention keeps one per query
      head); ``hidden_size = heads * head_dim``. Other head
      counts and head widths (MLA, linear attention, Mamba heads, rotary_dim) scale by the
      same factors, so the equalities between them hold; ``partial_rotary_factor`` stays.
    - MLP widths (``intermediate_size``, ``n_inner``, ``ffn_dim``, ``moe_intermediate_size``, ...)
      scale like hidden_size, or like ``intermediate`` / the old intermediate size if given.
    - at most 4 experts and 2 experts per token; low ranks <= 16; SSM state <= 16; sliding
      windows, attention/SSM chunks and sparse-attention budgets <= 8 (below a test length of
      16, so they are exercised); max positions in [64, 256]; ``vocab`` tokens, with special
      token ids outside it moved to its top end.
    - ``no_dropout``: dropout-like probabilities (and router jitter) set to 0.

    Sub-configs (``text_config``, ``vision_config``, ...) shrink by the same rules.
    """
    if layers < 1 or head_dim < 2 or vocab < 8:
        raise ValueError("probe_config needs layers >= 1, head_dim >= 2 and vocab >= 8")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    args = dict(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
                intermediate=intermediate, no_dropout=no_dropout)
    used = {t for t in _token_ids(cfg.to_dict()) if 0 <= t < vocab}
    new, _ = _shrink(cfg, args, _Tokens(vocab, used))
    out = type(cfg).from_dict(new)
    out._name_or_path = getattr(cfg, "_name_or_path", "")
    return out


# --- families ------------------------------------------------------------------------------

def causal_lm_families() -> list[str]:
    """The ``model_type`` of every family ``AutoModelForCausalLM`` can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causal_lm_class(cfg: PretrainedConfig) -> type:
    """The class ``AutoModelForCausalLM.from_config(cfg)`` builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]


_MEDIA_INPUTS = re.compile(r"pixel|image|video|audio|input_features|input_values|speech")
_MEDIA_CONFIGS = re.compile(r"vision|audio|image|vq|speech|visual")
# recurrent / state-space blocks (a class counted here is not also counted as attention)
_RECURRENT = re.compile(r"mamba|mixer|rwkv|xlstm|mlstm|slstm|recurrent|rglru|delta|shortconv"
                        r"|short_conv|lightning|linearattention|linear_attention|ssm", re.I)
_ATTENTION = re.compile(r"attention|attn", re.I)
_MOE = re.compile(r"moe|experts|router|sparse_?mlp|sparseblock", re.I)
_FAMILY_PREFIX = re.compile(r"^(.+?)(For|LMHead|WithLMHead|Decoder$|Model$)")

# Families whose classes do not say what they are.
_KIND_OVERRIDES = {
    "rwkv": "ssm",  # its WKV time-mixing recurrence is a class named RwkvSelfAttention
    "xlnet": "other",  # permutation LM with two-stream attention
    "gemma4_assistant": "other",  # draft models: they read the main model's KV states
    "gemma4_unified_assistant": "other",
}


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _defined_classes(cls: type) -> set[str]:
    """Module classes the family's modeling file defines (what the family can build)."""
    module = inspect.getmodule(cls)
    return {n for n, obj in vars(module).items() if isinstance(obj, type)
            and issubclass(obj, torch.nn.Module)} if module else set()


def _built_classes(cfg: PretrainedConfig) -> set[str] | None:
    """Class names of the modules a tiny meta-device copy of the model is built from."""
    from transformers import AutoModelForCausalLM

    try:
        small = probe_config(cfg, heads=4, head_dim=16, vocab=256)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(small)
        return {type(m).__name__ for m in model.modules()}
    except Exception:  # noqa: BLE001 - a family whose default config does not build
        return None


def _expert_count(cfg: PretrainedConfig) -> int:
    d = cfg.to_dict()
    counts = [v for k, v in d.items() if _EXPERTS.search(k) and _is_int(v)]
    sub = d.get("ffn_config")  # dbrx keeps its experts in a sub-config
    if isinstance(sub, dict):
        counts += [v for k, v in sub.items() if _EXPERTS.search(k) and _is_int(v)]
    return max(counts, default=0)


def family_kind(model_type: str | PretrainedConfig) -> str:
    """decoder | moe | ssm | hybrid | encoder-decoder | encoder | multimodal | other.

    Read from the config and the model rather than a list, first match wins:
    ``is_encoder_decoder``, or a causal-LM class that is the decoder half of one (it sets
    ``is_decoder``): encoder-decoder. Media inputs to ``forward`` or vision/audio sub-configs:
    multimodal. A class that wants ``is_decoder`` or a config marked encoder/non-causal:
    encoder. Recurrent / state-space classes in the family's modeling file (Mamba mixers,
    RG-LRU, delta-rule and short-conv blocks), with attention classes (hybrid) or without
    (ssm). Expert/router modules in a tiny built copy (or, if the default config does not
    build, expert classes in the modeling file or more than one expert in the config): moe.
    Attention classes: decoder.
    ``_KIND_OVERRIDES`` holds the few families whose classes do not say it.
    """
    name = model_type if isinstance(model_type, str) else model_type.model_type
    if name in _KIND_OVERRIDES:
        return _KIND_OVERRIDES[name]
    cfg = AutoConfig.for_model(model_type) if isinstance(model_type, str) else model_type
    cls = causal_lm_class(cfg)
    init = _source(cls.__init__)
    if getattr(cfg, "is_encoder_decoder", False) or "config.is_decoder = True" in init:
        return "encoder-decoder"
    params = inspect.signature(cls.forward).parameters
    subs = _sub_configs(cfg, cfg.to_dict())
    if any(_MEDIA_INPUTS.search(p) for p in params) or any(_MEDIA_CONFIGS.search(k)
                                                           for k in subs):
        return "multimodal"
    if (re.search(r"(not|assert) config\.is_decoder", init)
            or getattr(cfg, "is_encoder", False) or getattr(cfg, "causal", True) is False):
        return "encoder"
    match = _FAMILY_PREFIX.match(cls.__name__)
    prefix = match.group(1) if match else ""
    defined = {c.removeprefix(prefix) for c in _defined_classes(cls)}
    recurrent = bool(prefix and _RECURRENT.search(prefix)) or any(
        _RECURRENT.search(c) for c in defined)
    attention = any(_ATTENTION.search(c) and not _RECURRENT.search(c) for c in defined)
    if recurrent:
        return "hybrid" if attention else "ssm"
    built = _built_classes(cfg)
    if built is not None:
        moe = any(_MOE.search(c.removeprefix(prefix)) for c in built)
    else:
        moe = _expert_count(cfg) > 1 or any(_MOE.search(c) for c in defined)
    if moe:
        return "moe"
    return "decoder" if attention else "other"
