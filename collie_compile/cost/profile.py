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
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from collie_compile import disk_cache
from collie_compile.dtypes import DTYPE_BYTES, check_dtype
from collie_compile.errors import CollieError, named
from collie_compile.models.presets import config_identity

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Bump when ModelProfile or what it measures changes: disk-cached profiles are keyed by it,
# and by the source of the modules that measure one.
PROFILE_SCHEMA = 9
_PROFILE_CODE = ("collie_compile.cost.profile", "collie_compile.cost.measure_profile",
                 "collie_compile.capture.annotate", "collie_compile.capture.export",
                 "collie_compile.models.registry", "collie_compile.models.probe",
                 "collie_compile.models.attention", "collie_compile.models.experts",
                 "collie_compile.recompute_policy")
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
    # the front (runtime.refusals.tp_refusal dry-runs the tensor_parallel pass), not measured here
    tp_refusal: str | None = None
    # parameters one token uses: routed experts count k of E (None: every parameter, dense)
    active_params: int | None = None
    # routed experts of one block (0: dense): how many, their parameters (weights and
    # biases, [experts, ...]), the rows a sample sends them (seq x k) and their forward
    # FLOPs per sample; what expert parallelism splits, moves and waits for
    num_experts: int = 0
    block_expert_params: int = 0
    expert_rows: int = 0
    block_expert_flops: int = 0
    act_experts: int = 0  # of act_none, what the experts save per sample (rows-bound)

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
    """Capture a two-block probe of ``model`` and summarise it (cached per arguments).

    A profile depends only on the config, sequence length, dtype and the versions of torch,
    transformers and this package: it is kept on disk (JSON) keyed by all of them. A
    preset or config.json already profiled is read back without importing torch or
    transformers (the planner CLI's quick path)."""
    dtype = check_dtype(dtype)
    if seq_len < 2:
        raise CollieError(f"{named('seq_len')} must be at least 2, got {seq_len}")
    if isinstance(model, (str, os.PathLike)):
        model = str(model)
        return _cached_profile("model", model, config_identity(model) or "", seq_len, dtype)
    from collie_compile.models.registry import model_name

    return _cached_profile("config", model_name(model), model.to_json_string(), seq_len, dtype)


@functools.lru_cache(maxsize=32)
def _cached_profile(kind: str, ref: str, fingerprint: str, seq_len: int,
                    dtype: str) -> ModelProfile:
    """``kind`` "model": ``ref`` is a MODEL argument, ``fingerprint`` its config's identity
    ("" when it names none: measuring then says why); "config": ``ref`` is the model's
    name and ``fingerprint`` its config as JSON."""
    path = (disk_cache.entry("profile", [kind, ref, fingerprint, str(seq_len), dtype,
                                         str(PROFILE_SCHEMA),
                                         *disk_cache.code_of(*_PROFILE_CODE)])
            if fingerprint else None)
    hit = _from_json(disk_cache.read(path)) if path else None
    if hit is not None:
        return hit
    from collie_compile.cost.measure_profile import measure_profile

    prof = measure_profile(kind, ref, fingerprint, seq_len, dtype)
    if path:
        disk_cache.write(path, asdict(prof))
    return prof


def _from_json(data: object) -> ModelProfile | None:
    """A profile read back from the cache, None if the entry is not one (damaged, old)."""
    try:
        data = dict(data)
        for k in ("act_none", "act_selective", "act_full", "act_frozen", "act_expanded_kv"):
            data[k] = ActivationBytes(**data[k])
        return ModelProfile(**data)
    except (TypeError, KeyError, ValueError):
        return None
