"""Summarise a model into the plain numbers the cost model needs.

A :class:`ModelProfile` is built from a *probe*: the model with two decoder blocks,
captured and annotated (:mod:`collie_compile.capture.annotate`). One block's parameters, FLOPs
and saved-for-backward bytes stand for all of them (the costlier of the two where they
differ: see :func:`_priced_block`), and the probe costs the same to capture for a 7B and
a 405B model. Everything per sample is
exactly linear in the micro-batch size (measured at two sizes to separate the part that
does not grow with batch, such as the causal mask and rotary tables).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from collie_compile.capture.annotate import AnnotatedGraph, annotate, block_graph, measure_saved
from collie_compile.capture.export import capture
from collie_compile.dtypes import DTYPE_BYTES, torch_dtype
from collie_compile.errors import CollieError, named
from collie_compile.models.probe import attention_heads
from collie_compile.models.registry import (
    build_model,
    config_from_dict,
    count_params,
    load_config,
    model_name,
    with_layers,
)

# Bump when ModelProfile or what it measures changes: disk-cached profiles are keyed by it.
PROFILE_SCHEMA = 8
PROBE_BLOCKS = 2


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes saved for backward per sample (one sequence) of one decoder block."""

    replicated: int  # identical on every tensor-parallel rank
    sharded: int  # split over tensor-parallel ranks

    def __add__(self, other: ActivationBytes) -> ActivationBytes:
        return ActivationBytes(self.replicated + other.replicated, self.sharded + other.sharded)

    def per_rank(self, tp: int, sequence_parallel: bool = False) -> float:
        rep = self.replicated / tp if sequence_parallel else self.replicated
        return rep + self.sharded / tp


@dataclass(frozen=True)
class ModelProfile:
    """What the cost model knows about a model at one sequence length and dtype."""

    name: str
    model_type: str
    seq_len: int
    dtype: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    num_params: int
    block_params: int  # one decoder block
    block_params_sharded: int  # of which split by tensor parallelism (linear weights)
    embed_params: int  # before the first block (token + position embeddings)
    head_params: int  # after the last block (final norm, LM head unless tied)
    tied_params: int  # LM head weight shared with the input embedding (0 if untied)
    largest_param: int  # numel of the largest single parameter tensor
    factored_state_elems: int  # AdaLomo's rows+cols per matrix (numel per vector), all params
    block_flops: int  # forward FLOPs of one block, per sample
    block_matmul_flops: int  # of which in linears and attention (compute-bound)
    block_bytes: int  # forward memory traffic of one block, per sample
    block_other_bytes: int  # of which outside linears and attention (memory-bound)
    embed_flops: int
    head_flops: int  # final norm + LM head + loss, per sample
    act_none: ActivationBytes  # saved per block without recomputation
    act_selective: ActivationBytes  # recompute all but matmul/attention outputs
    act_full: ActivationBytes  # recompute the whole block: keep its input only
    act_frozen: ActivationBytes  # saved per block when its weights are frozen (LoRA base)
    # More saved per block without recomputation (and with frozen weights) where
    # grouped-query attention runs with K/V expanded: on devices with no fused kernel
    # for groups in this dtype (collie_compile.models.attention). 0 without grouped-query SDPA.
    act_expanded_kv: ActivationBytes
    act_embed: int  # saved per sample outside the blocks, before them
    act_head: int  # saved per sample by final norm, LM head and loss
    act_fixed: int  # saved once, independent of batch (masks, rotary tables)
    logits_bytes: int  # one sample's logits [seq, vocab] in fp32
    row_linears_per_block: int  # all-reduces per block forward under tensor parallelism
    block_graph: list[dict]  # one block's nodes, per sample (see annotate.block_graph)
    # why tp > 1 cannot run this model exactly (None: it can, or nobody asked); set by
    # the front (runtime.tp_refusal dry-runs the tensor_parallel pass), not measured here
    tp_refusal: str | None = None

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def activations(self, recompute: str) -> ActivationBytes:
        try:
            return {"none": self.act_none, "selective": self.act_selective,
                    "full": self.act_full}[recompute]
        except KeyError:
            raise CollieError(f"unknown recompute {recompute!r}; use none, selective or "
                              "full") from None


def profile_model(model: str | PretrainedConfig, seq_len: int = 2048,
                  dtype: str = "bf16") -> ModelProfile:
    """Capture a two-block probe of ``model`` and summarise it (cached per arguments)."""
    cfg = load_config(model)
    torch_dtype(dtype)  # a known name
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos and seq_len > max_pos:
        raise CollieError(f"{named('seq_len')} {seq_len} exceeds {model_name(cfg)}'s maximum of "
                          f"{max_pos} positions; use at most that")
    if seq_len < 2:
        raise CollieError(f"{named('seq_len')} must be at least 2, got {seq_len}")
    return _cached_profile(cfg.to_json_string(), model_name(cfg), seq_len, dtype)


def cache_dir() -> Path:
    """Where profiles are kept between runs ($COLLIE_COMPILE_CACHE, or ~/.cache)."""
    root = os.environ.get("COLLIE_COMPILE_CACHE") or Path.home() / ".cache" / "collie-compile"
    return Path(root) / "profiles"


@functools.lru_cache(maxsize=32)
def _cached_profile(cfg_json: str, name: str, seq_len: int, dtype: str) -> ModelProfile:
    """A profile depends only on the config, sequence length, dtype and the versions of
    torch, transformers and this package: keep it on disk (JSON) keyed by all of them."""
    import transformers

    from collie_compile import __version__

    key = hashlib.sha256("\0".join([cfg_json, name, str(seq_len), dtype, torch.__version__,
                                     transformers.__version__, __version__,
                                     str(PROFILE_SCHEMA)]).encode())
    path = cache_dir() / f"{key.hexdigest()[:32]}.json"
    try:
        data = json.loads(path.read_text())
        for k in ("act_none", "act_selective", "act_full", "act_frozen",
                  "act_expanded_kv"):
            data[k] = ActivationBytes(**data[k])
        return ModelProfile(**data)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or unreadable: measure again
    prof = _profile(cfg_json, name, seq_len, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(prof)))
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only home is no reason to fail planning
    return prof


def _profile(cfg_json: str, name: str, seq_len: int, dtype: str) -> ModelProfile:
    cfg = config_from_dict(json.loads(cfg_json), name)
    full = build_model(cfg, dtype=torch_dtype(dtype))
    layers = int(cfg.num_hidden_layers)
    probe_layers = min(layers, PROBE_BLOCKS)
    probe = build_model(with_layers(cfg, probe_layers), dtype=torch_dtype(dtype))
    # sequences up to seq_len only: a sliding window at least that long is then no mask
    ag = annotate(capture(probe, max_seq=seq_len), probe)
    b = _priced_block(ag, probe_layers)
    s = seq_len
    one, two = measure_saved(ag, 1, s, b), measure_saved(ag, 2, s, b)

    act_none = ActivationBytes(two.block_replicated - one.block_replicated,
                               two.block_sharded - one.block_sharded)
    one_f, two_f = (measure_saved(ag, n, s, b, frozen=True) for n in (1, 2))
    act_frozen = ActivationBytes(two_f.block_replicated - one_f.block_replicated,
                                 two_f.block_sharded - one_f.block_sharded)
    act_expanded_kv = ActivationBytes(0, 0)
    if _grouped_query_attention(ag, b):
        one_x, two_x = (measure_saved(ag, n, s, b, expand_kv=True) for n in (1, 2))
        act_expanded_kv = ActivationBytes(
            two_x.block_replicated - one_x.block_replicated - act_none.replicated,
            two_x.block_sharded - one_x.block_sharded - act_none.sharded)
    block_in = _block_input_bytes(ag, s, b)
    sel_rep, sel_shard = _matmul_output_bytes(ag, s, b)
    rest_slope = two.rest - one.rest
    embed_saved, head_saved = _split_rest(ag, two.by_node, one.by_node)
    params = _param_groups(full, ag, b)
    head_dim_heads, kv_heads = attention_heads(cfg)
    return ModelProfile(
        name=name, model_type=cfg.model_type, seq_len=s, dtype=dtype, num_layers=layers,
        hidden_size=int(cfg.hidden_size), vocab_size=int(cfg.vocab_size),
        num_heads=head_dim_heads,
        num_kv_heads=kv_heads,
        num_params=count_params(full), **params,
        block_flops=ag.flops(1, s, b), block_bytes=ag.bytes_moved(1, s, b),
        block_matmul_flops=sum(ag.subs(n.flops, 1, s) for n in ag.block_nodes(b)
                               if n.kind in ("linear", "attention")),
        block_other_bytes=sum(ag.subs(n.bytes, 1, s) for n in ag.block_nodes(b)
                              if n.kind not in ("linear", "attention")),
        embed_flops=_rest_sum(ag, s, embed=True, what="flops"),
        head_flops=_rest_sum(ag, s, embed=False, what="flops"),
        act_none=act_none,
        act_selective=ActivationBytes(block_in + sel_rep, sel_shard),
        act_full=ActivationBytes(block_in, 0),
        act_frozen=act_frozen,
        act_expanded_kv=act_expanded_kv,
        act_embed=embed_saved, act_head=head_saved,
        act_fixed=max(0, one.rest - rest_slope),
        logits_bytes=s * int(cfg.vocab_size) * 4,
        row_linears_per_block=sum(1 for n in ag.block_nodes(b)
                                  if n.kind == "linear" and not n.sharded),
        block_graph=block_graph(ag, s, b),
    )


def _priced_block(ag: AnnotatedGraph, probe_layers: int) -> int:
    """The probe block that stands for every block: block 0 where all are alike; where
    they differ (layers without RoPE, sliding-window beside full attention, a norm or bias
    on some layers only), the costliest in parameters, then FLOPs, then traffic, so that
    every block is priced at most at what it costs and a plan that fits does fit."""
    if ag.blocks_identical:
        return 0
    return max(range(probe_layers), key=lambda i: (
        sum(_prod(ag.param_shapes[p]) for p in {p for n in ag.block_nodes(i) for p in n.params}),
        ag.flops(1, 1024, i), ag.bytes_moved(1, 1024, i)))


def _grouped_query_attention(ag: AnnotatedGraph, block: int) -> bool:
    """Whether ``block`` calls SDPA with ``enable_gqa`` (grouped-query attention)."""
    gm_nodes = {n.name: n for n in ag.gm.graph.nodes}
    return any(i.kind == "attention" and gm_nodes[i.name].kwargs.get("enable_gqa")
               for i in ag.block_nodes(block))


def _block_input_bytes(ag: AnnotatedGraph, seq: int, block: int) -> int:
    """Bytes of one sample's hidden state entering a block (what full recompute keeps)."""
    last = [n for n in ag.block_nodes(block) if n.shape is not None][-1]
    itemsize = torch.tensor([], dtype=last.dtype).element_size()
    return ag.subs(_prod(last.shape), 1, seq) * itemsize


def _matmul_output_bytes(ag: AnnotatedGraph, seq: int, block: int) -> tuple[int, int]:
    """Per-sample bytes of matmul and attention outputs in ``block``: what selective keeps."""
    rep = shard = 0
    for n in ag.block_nodes(block):
        if n.kind in ("linear", "attention") and n.shape is not None:
            b = ag.subs(_prod(n.shape), 1, seq) * torch.tensor([], dtype=n.dtype).element_size()
            if n.sharded:
                shard += b
            else:
                rep += b
    return rep, shard


def _prod(shape: tuple) -> object:
    out = 1
    for d in shape:
        out = out * d
    return out


def _first_block_index(ag: AnnotatedGraph) -> int:
    names = list(ag.nodes)
    return next(i for i, n in enumerate(names) if ag.nodes[n].block is not None)


def _split_rest(ag: AnnotatedGraph, two: dict[str, int], one: dict[str, int]) -> tuple[int, int]:
    """Per-sample saved bytes outside the blocks, split into before and after them."""
    names = list(ag.nodes)
    first = _first_block_index(ag)
    embed = head = 0
    for name in set(two) | set(one):
        info = ag.nodes.get(name)
        if info is not None and info.block is not None:
            continue
        per_sample = two.get(name, 0) - one.get(name, 0)
        if name in ag.nodes and names.index(name) < first:
            embed += per_sample
        else:
            head += per_sample
    return embed, head


def _rest_sum(ag: AnnotatedGraph, seq: int, embed: bool, what: str) -> int:
    names = list(ag.nodes)
    first = _first_block_index(ag)
    total = 0
    for i, name in enumerate(names):
        info = ag.nodes[name]
        if info.block is None and (i < first) == embed:
            total += ag.subs(getattr(info, what), 1, seq)
    return total


def _param_groups(full: torch.nn.Module, ag: AnnotatedGraph, b: int) -> dict[str, int]:
    """Parameter counts per part of the model, from which nodes use which parameters."""
    names = list(ag.nodes)
    first = _first_block_index(ag)
    numel = {k: _prod(v) for k, v in ag.param_shapes.items()}
    block = {p for n in ag.block_nodes(b) for p in n.params}
    sharded = {p for n in ag.block_nodes(b) if n.kind == "linear" for p in n.params
               if len(ag.param_shapes[p]) == 2}
    embed, head = set(), set()
    for i, name in enumerate(names):
        info = ag.nodes[name]
        if info.block is None:
            (embed if i < first else head).update(info.params)
    # Tied LM head: the same tensor under two names; count it once, with the embedding.
    probe_ids = {}
    for k, p in ag.gm.named_parameters(remove_duplicate=False):
        probe_ids.setdefault(id(p), []).append(k)
    tied = 0
    for aliases in probe_ids.values():
        if len(aliases) > 1 and any(a in head for a in aliases):
            tied = numel[aliases[0]]
            head -= set(aliases)
    largest = max(p.numel() for p in full.parameters())
    factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in full.parameters())
    return dict(block_params=sum(numel[p] for p in block),
                block_params_sharded=sum(numel[p] for p in sharded),
                embed_params=sum(numel[p] for p in embed),
                head_params=sum(numel[p] for p in head),
                tied_params=tied, largest_param=largest, factored_state_elems=factored)
