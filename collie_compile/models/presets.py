"""Named models: the published Hugging Face configs of the presets (no download, no
torch), and what identifies a MODEL argument's config for caches."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named model: its HF ``model_type``, config fields and where they come from."""

    model_type: str
    config: dict[str, Any]
    source: str


def _llama(h: int, inter: int, layers: int, heads: int, kv: int | None = None, vocab: int = 32000,
           max_pos: int = 2048, eps: float = 1e-6, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv or heads, vocab_size=vocab,
                max_position_embeddings=max_pos, rms_norm_eps=eps, tie_word_embeddings=False,
                **extra)


_LLAMA3 = dict(vocab=128256, max_pos=8192, eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001)

PRESETS: dict[str, Preset] = {
    "gpt2": Preset("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                                n_head=12), "openai-community/gpt2"),
    # CoLLiE's LLaMA 3B: OpenLLaMA's (LLaMA itself has no 3B)
    "open-llama-3b": Preset("llama", _llama(3200, 8640, 26, 32), "openlm-research/open_llama_3b"),
    "llama-7b": Preset("llama", _llama(4096, 11008, 32, 32), "huggyllama/llama-7b"),
    "llama-13b": Preset("llama", _llama(5120, 13824, 40, 40), "huggyllama/llama-13b"),
    "llama-30b": Preset("llama", _llama(6656, 17920, 60, 52), "huggyllama/llama-30b"),
    "llama-65b": Preset("llama", _llama(8192, 22016, 80, 64), "huggyllama/llama-65b"),
    "llama-2-7b": Preset("llama", _llama(4096, 11008, 32, 32, max_pos=4096, eps=1e-5),
                         "meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": Preset("llama", _llama(5120, 13824, 40, 40, max_pos=4096, eps=1e-5),
                          "meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": Preset("llama", _llama(8192, 28672, 80, 64, kv=8, max_pos=4096, eps=1e-5),
                          "meta-llama/Llama-2-70b-hf"),
    "llama-3-8b": Preset("llama", _llama(4096, 14336, 32, 32, kv=8, **_LLAMA3),
                         "meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b": Preset("llama", _llama(8192, 28672, 80, 64, kv=8, **_LLAMA3),
                          "meta-llama/Meta-Llama-3-70B"),
    "llama-3.1-405b": Preset("llama", _llama(
        16384, 53248, 126, 128, kv=8, **{**_LLAMA3, "max_pos": 131072},
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
        "meta-llama/Llama-3.1-405B"),
    "mistral-7b": Preset("mistral", _llama(4096, 14336, 32, 32, kv=8, max_pos=32768, eps=1e-5,
                                           rope_theta=10000.0, sliding_window=4096),
                         "mistralai/Mistral-7B-v0.1"),
    "qwen2-7b": Preset("qwen2", _llama(3584, 18944, 28, 28, kv=4, vocab=152064, max_pos=131072,
                                       rope_theta=1000000.0), "Qwen/Qwen2-7B"),
    # Mixtures of experts: every expert in memory, k of E a token
    "mixtral-8x7b": Preset("mixtral", _llama(
        4096, 14336, 32, 32, kv=8, max_pos=32768, eps=1e-5, rope_theta=1000000.0,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
        "mistralai/Mixtral-8x7B-v0.1"),
    "qwen3-30b-a3b": Preset("qwen3_moe", _llama(
        2048, 6144, 48, 32, kv=4, vocab=151936, max_pos=40960, rope_theta=1000000.0,
        head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
        "Qwen/Qwen3-30B-A3B"),
    "gpt-oss-20b": Preset("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, rope_theta=150000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          truncate=False, original_max_position_embeddings=4096)),
        "openai/gpt-oss-20b"),
    # latent attention, 1 shared + 256 routed experts (8 a token), 3 dense layers first;
    # without the multi-token-prediction layer the checkpoint adds (transformers builds none)
    "deepseek-v3": Preset("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        max_position_embeddings=163840, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0,
                          mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096)),
        "deepseek-ai/DeepSeek-V3"),
    # Tiny models for tests and CPU runs: same code paths, seconds to train.
    "tiny-llama": Preset("llama", _llama(64, 172, 2, 4, kv=2, vocab=256, max_pos=256),
                         "collie-compile test model"),
    "tiny-mistral": Preset("mistral", _llama(64, 172, 2, 4, kv=2, vocab=256, max_pos=256,
                                             sliding_window=128), "collie-compile test model"),
    "tiny-qwen2": Preset("qwen2", _llama(64, 172, 2, 4, kv=2, vocab=256, max_pos=256),
                         "collie-compile test model"),
    "tiny-gpt2": Preset("gpt2", dict(vocab_size=256, n_positions=256, n_embd=64, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                      "collie-compile test model"),
    "tiny-mixtral": Preset("mixtral", _llama(64, 128, 2, 4, kv=2, vocab=256, max_pos=256,
                                             num_local_experts=8, num_experts_per_tok=2,
                                             sliding_window=None),
                           "collie-compile test model"),
    # ~20M parameters: big enough that model states dominate memory, small enough for CPU.
    "small-llama": Preset("llama", _llama(384, 1024, 6, 6, kv=2, vocab=8192, max_pos=1024),
                          "collie-compile test model"),
}


def config_path(model: str) -> Path | None:
    """The config.json a MODEL argument that is not a preset names, if there is one."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    return path if path.is_file() else None


def config_identity(model: object) -> str | None:
    """Text that changes whenever the config ``model`` names does (a preset's fields, a
    file's bytes, and the code that turns them into a config); None for an argument that
    names no config (a config object, an unknown name)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    model = str(model)
    loader = Path(__file__).with_name("registry.py").read_text()
    if model in PRESETS:
        p = PRESETS[model]
        return json.dumps([model, p.model_type, p.config, loader], sort_keys=True)
    path = config_path(model)
    try:
        return None if path is None else f"{path.resolve()}\0{path.read_text()}\0{loader}"
    except OSError:
        return None
