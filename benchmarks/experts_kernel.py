"""Routed experts on one device: transformers' loop over experts, transformers' own
grouped_mm, and the rank program collie-compile builds (its grouped_experts pass taking
torch's fused grouped GEMM where the device has it), tokens/s side by side in one run.

A Mixtral-style model (8 experts, 2 a token) trains AdamW steps on random tokens: bf16 on
a CUDA device (where the fused kernel runs), fp32 on the CPU (where every path loops over
experts, so the CPU table measures only the overhead of the ways in). tokens/s from the
median of the timed steps, after warm-up steps.
"""

from __future__ import annotations

import statistics
import time

import torch

from .report import Report, table

WARMUP, STEPS = 2, 6


def _config(cuda: bool) -> object:
    from transformers import MixtralConfig

    width = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=16,
                 num_key_value_heads=4) if cuda else dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    return MixtralConfig(vocab_size=8192, num_hidden_layers=4, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, **width)


def _timed(step: object, tokens: int) -> float:
    """tokens/s of the median step."""
    times = []
    for i in range(WARMUP + STEPS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def _hf(cfg: object, implementation: str, ids: torch.Tensor, device: str,
        dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device, dtype)
    model.set_experts_implementation(implementation)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    return _timed(step, ids.numel())


def _ours(cfg: object, ids: torch.Tensor, device: str, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    import collie_compile

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    pm = collie_compile.parallelize(model, dp=1, tp=1, pp=1, zero=0, recompute="none",
                                    seq_len=ids.shape[1], global_batch_size=ids.shape[0],
                                    micro_batch_size=ids.shape[0], optimizer="adamw",
                                    lr=1e-5)
    batch = {"input_ids": ids.cpu()}
    return _timed(lambda: pm.train_step(batch), ids.numel())


def main(out: str | None = None) -> None:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rep = Report("experts", out)
    cfg = _config(cuda)
    batch, seq = (8, 1024) if cuda else (4, 64)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    rows = [["transformers, eager (a loop over experts)", _hf(cfg, "eager", ids, device, dtype)],
            ["transformers, grouped_mm", _hf(cfg, "grouped_mm", ids, device, dtype)],
            ["collie-compile rank program (one process)", _ours(cfg, ids, device, dtype)]]
    base = rows[0][1]
    rep.add(f"Mixtral-style, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_local_experts} experts (top {cfg.num_experts_per_tok}), "
            f"{str(dtype).removeprefix('torch.')}, batch {batch} x {seq}, AdamW; median of "
            f"{STEPS} steps after {WARMUP}.\n")
    rep.add(table(["experts run by", "tokens/s", "vs the loop"],
                  [[name, f"{t:,.0f}", f"{t / base:.2f}x"] for name, t in rows], right=(1, 2)))
    rep.save()
