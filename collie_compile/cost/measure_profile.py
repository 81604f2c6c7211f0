"""Measure a model's :class:`~collie_compile.cost.profile.ModelProfile` from its probe:
the model cut to two decoder blocks, captured on the meta device and annotated. Imported
only when a profile is not in the cache (it needs torch and transformers' modeling)."""

from __future__ import annotations

import json

import torch

from collie_compile.capture.annotate import AnnotatedGraph, annotate, block_graph, measure_saved
from collie_compile.capture.export import capture
from collie_compile.cost.profile import PROBE_BLOCKS, ActivationBytes, ModelProfile
from collie_compile.dtypes import torch_dtype
from collie_compile.errors import CollieError, named
from collie_compile.layout import MATMUL_KINDS
from collie_compile.models.probe import attention_heads
from collie_compile.models.registry import (
    build_model,
    config_from_dict,
    count_params,
    load_config,
    model_name,
    with_layers,
)


def measure_profile(kind: str, ref: str, fingerprint: str, seq_len: int,
                    dtype: str) -> ModelProfile:
    """The profile of a MODEL argument (``kind`` "model", ``ref`` the argument) or of a
    config (``kind`` "config", ``ref`` its name, ``fingerprint`` its JSON)."""
    cfg = load_config(ref if kind == "model" else config_from_dict(json.loads(fingerprint), ref))
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos and seq_len > max_pos:
        raise CollieError(f"{named('seq_len')} {seq_len} exceeds {model_name(cfg)}'s maximum of "
                          f"{max_pos} positions; use at most that")
    return _profile(cfg.to_json_string(), model_name(cfg), seq_len, dtype)


def _profile(cfg_json: str, name: str, seq_len: int, dtype: str) -> ModelProfile:
    cfg = config_from_dict(json.loads(cfg_json), name)
    full = build_model(cfg, dtype=torch_dtype(dtype))
    layers = int(cfg.num_hidden_layers)
    probe_layers = min(layers, PROBE_BLOCKS)
    probe = build_model(with_layers(cfg, probe_layers), dtype=torch_dtype(dtype))
    _probe_holds_experts(full, probe, name)
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
                               if n.kind in MATMUL_KINDS),
        block_other_bytes=sum(ag.subs(n.bytes, 1, s) for n in ag.block_nodes(b)
                              if n.kind not in MATMUL_KINDS),
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
                                  if n.kind == "linear" and not n.sharded
                                  and not n.replicated),
        block_graph=block_graph(ag, s, b),
        active_params=active_params(full, ag, s),
        **_block_experts(ag, s, b, {k: two.by_node.get(k, 0) - v
                                    for k, v in one.by_node.items()}),
    )


def _block_experts(ag: AnnotatedGraph, seq: int, b: int, saved: dict[str, int]
                   ) -> dict[str, int]:
    """Block ``b``'s routed experts: their count, parameters, the rows a sample sends
    them, their FLOPs (each bank's grouped products) and what they save for backward per
    sample (``saved``: bytes per node and sample); none for a dense block."""
    nodes = [n for n in ag.block_nodes(b) if n.kind == "experts"]
    if not nodes:
        return {}
    banks = {n.module for n in nodes}
    params = {p for p in ag.param_shapes if p.rpartition(".")[0] in banks}
    experts = max(ag.param_shapes[p][0] for p in params)
    rows = {n.module: ag.subs(n.shape[0], 1, seq) for n in nodes}  # one product per bank
    return dict(num_experts=int(experts),
                block_expert_params=sum(_prod(ag.param_shapes[p]) for p in params),
                expert_rows=int(sum(rows.values())),
                block_expert_flops=sum(ag.subs(n.flops, 1, seq) for n in nodes),
                act_experts=sum(saved.get(n.name, 0) for n in ag.block_nodes(b)
                                if n.module in banks))


def _probe_holds_experts(full: torch.nn.Module, probe: torch.nn.Module, name: str) -> None:
    """Refuse to price a mixture of experts from a probe whose blocks hold none (MoE layers
    only every k-th layer, or listed by index): its blocks would be priced as dense ones,
    a fraction of their weights."""
    from collie_compile.models.experts import has_experts

    if has_experts(full) and not has_experts(probe):
        raise CollieError(f"{name}: the first {PROBE_BLOCKS} blocks, which collie-compile "
                          "prices every block by, hold no routed experts (its MoE layers "
                          "come later or every few layers); pricing it would leave the "
                          "experts out")


def active_params(full: torch.nn.Module, ag: AnnotatedGraph, seq: int) -> int | None:
    """Parameters one token uses: each routed experts bank of ``full`` counts k of its E
    experts, k read from the probe's graph (its grouped products take k rows a token);
    None for a dense model."""
    from collie_compile.models.experts import has_experts

    if not has_experts(full):
        return None
    rows = {n.module: ag.subs(n.shape[0], 1, seq) for n in ag.nodes.values()
            if n.kind == "experts" and n.shape is not None}
    k = {m.rpartition(".")[2] or m: r // seq for m, r in rows.items()}  # by the bank's name
    unused = 0
    for path, mod in full.named_modules():
        name = path.rpartition(".")[2]
        if hasattr(mod, "_apply_gate") and hasattr(mod, "num_experts") and name in k:
            own = sum(p.numel() for p in mod.parameters(recurse=False))
            unused += own * (mod.num_experts - k[name]) // mod.num_experts
    return count_params(full) - unused


def _priced_block(ag: AnnotatedGraph, probe_layers: int) -> int:
    """The probe block that stands for every block: block 0 where all are alike; where
    they differ (layers without RoPE, sliding-window beside full attention, a norm or bias
    on some layers only), the costliest in parameters, then FLOPs, then traffic, so that
    every block is priced at most at what it costs and a plan that fits does fit. A
    mixture of experts is priced by its blocks with routed experts (what expert
    parallelism splits): its leading dense ones, where it has some, are a few of many
    (DeepSeek-V3: 3 of 61) and smaller in real configs."""
    if ag.blocks_identical:
        return 0
    moe = [i for i in range(probe_layers)
           if any(n.kind == "experts" for n in ag.block_nodes(i))]
    return max(moe or range(probe_layers), key=lambda i: (
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
        if n.kind in MATMUL_KINDS and n.shape is not None:
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
    sharded = {p for n in ag.block_nodes(b) if n.kind == "linear" and not n.replicated
               for p in n.params if len(ag.param_shapes[p]) == 2}
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
