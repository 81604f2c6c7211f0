"""``collie-compile train``: train a model on a text file under torchrun.

Text becomes tokens with a local Hugging Face tokenizer (``--tokenizer DIR``) or, with
none, as UTF-8 bytes (ids 0-255: every preset's vocabulary covers them, and nothing is
downloaded). Each step draws the same random windows on every rank (a seeded generator),
so every rank passes the same global batch, as ``train_step`` expects.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from collie_compile.config import Pins
from collie_compile.dtypes import torch_dtype
from collie_compile.errors import CollieError, flag
from collie_compile.models.registry import build_model, load_config
from collie_compile.planner.result import Plan
from collie_compile.runtime import distributed as cdist


@dataclass
class TrainConfig:
    """What ``collie-compile train`` was asked; None: the plan file's value, or the
    default (seq_len 64, global batch 8, adamw, fp32) with plan "auto"."""

    model: str
    data: str
    steps: int = 20
    seq_len: int | None = None
    global_batch_size: int | None = None
    optimizer: str | None = None
    dtype: str | None = None
    lr: float | None = None
    plan: str = "auto"
    gpu: str | None = None  # the auto plan's hardware: this machine's GPU by default
    tokenizer: str | None = None
    weights: str | None = None
    save: str | None = None
    seed: int = 0
    pins: Pins = field(default_factory=Pins)
    check: bool = False  # rank 0 then trains one process the same way and compares
    lora_rank: int | None = None  # train LoRA adapters only (peft's LoraConfig fields)
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    merge: bool = False  # with LoRA, save the adapters folded into plain HF weights
    memory_reserve: float | None = None  # kept free by the auto plan (None: 0.05)
    update_in_backward: bool | None = None  # None: the plan's choice
    max_grad_norm: float | None = None  # clip the global gradient norm
    clip_mode: str = "two-pass"  # inside backward: measure first, or the previous norm


def tokenize(path: str | Path, tokenizer: str | None, vocab_size: int) -> torch.Tensor:
    """The file's tokens as one long tensor."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CollieError(f"cannot read training data {path}: {e.strerror}") from None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    else:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise CollieError(f"token id {int(ids.max())} is outside the model's vocabulary of "
                          f"{vocab_size}; use a tokenizer that matches the model")
    return ids


def windows(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq`` tokens."""
    if tokens.numel() < seq + 1:
        raise CollieError(f"the training data has {tokens.numel()} tokens, fewer than one "
                          f"sequence of {seq}; use a longer file or a smaller --seq-len")
    starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=gen)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


DEFAULTS = dict(seq_len=64, global_batch_size=8, optimizer="adamw", dtype="fp32")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill what was not asked from the plan file (so a plan runs as it was priced), or
    from :data:`DEFAULTS`; check the rest."""
    for k, v in (("steps", cfg.steps), ("seq_len", cfg.seq_len),
                 ("global_batch_size", cfg.global_batch_size)):
        if v is not None and v < 1:
            raise CollieError(f"{flag(k)} must be a positive integer, got {v}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise CollieError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.merge and cfg.lora_rank is None:
        raise CollieError("--merge folds LoRA adapters into the weights; without --lora-rank "
                          "there are none (--save alone writes the whole model)")
    fill = dict(DEFAULTS)
    if cfg.plan.lower() != "auto":
        planned = Plan.load(cfg.plan)
        fill = dict(seq_len=planned.seq_len, global_batch_size=planned.global_batch_size,
                    optimizer=planned.optimizer, dtype=planned.dtype)
        if cfg.lora_rank is None and cfg.lora_targets is None:
            fill.update(lora_rank=planned.lora_rank, lora_targets=planned.lora_targets)
    return replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})


def train(cfg: TrainConfig) -> list[float]:
    """Train and return the loss of every step (on every rank)."""
    from tqdm import tqdm

    from collie_compile.runtime.parallel_model import parallelize

    cdist.ensure_initialized()  # so errors in what follows are agreed, reported once
    cfg = cdist.agree(lambda: resolve(cfg))
    model_cfg = cdist.agree(lambda: load_config(cfg.model))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(model_cfg, device="meta" if cfg.weights else "cpu",
                        dtype=torch_dtype(cfg.dtype))
    pm = parallelize(model, plan=cfg.plan, optimizer=cfg.optimizer, lr=cfg.lr,
                     seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size,
                     gpu=cfg.gpu, weights=cfg.weights, lora_rank=cfg.lora_rank,
                     lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                     memory_reserve=cfg.memory_reserve,
                     update_in_backward=cfg.update_in_backward,
                     max_grad_norm=cfg.max_grad_norm, clip_mode=cfg.clip_mode,
                     **cfg.pins.given())
    tokens = cdist.agree(lambda: tokenize(cfg.data, cfg.tokenizer, int(model_cfg.vocab_size)))
    if cfg.save:  # before the training, not after it
        pm.check_save_path(cfg.save)
    # the adapters' random init, for --check's one-process run to start from
    start_adapters = ({k: v for k, v in pm.full_state_dict().items() if ".lora_" in k}
                      if cfg.check and pm.lora is not None else None)
    gen = torch.Generator().manual_seed(cfg.seed)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"plan: {pm.chosen.layout_str()}", flush=True)
        for note in pm.plan.notes:
            print(f"note: {note}", flush=True)
    losses = []
    tty = sys.stderr.isatty()  # a log file gets one line per tenth of the run instead
    bar = tqdm(range(cfg.steps), disable=not (rank0 and tty), unit="step")
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    every = max(1, cfg.steps // 10)
    for step in bar:
        start = time.perf_counter()
        loss = pm.train_step({"input_ids": windows(tokens, cfg.global_batch_size,
                                                   cfg.seq_len, gen)})
        if not math.isfinite(loss):  # the global loss: every rank sees it
            raise CollieError(f"the loss became {loss} at step {len(losses) + 1}; lower "
                              "--lr", shared=True)
        losses.append(loss)
        tok_s = tokens_per_step / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        if rank0 and not tty and (step % every == 0 or step == cfg.steps - 1):
            print(f"step {step + 1:5d}/{cfg.steps}  loss {loss:.4f}  {tok_s:,.0f} tokens/s",
                  flush=True)
    if cfg.save:
        pm.save_pretrained(cfg.save, merge=cfg.merge)
        if rank0:
            what = ("a PEFT LoRA adapter" if pm.lora is not None and not cfg.merge
                    else "a Hugging Face checkpoint")
            print(f"saved {what} to {cfg.save}", flush=True)
    if cfg.check:
        if rank0:
            compare_with_one_process(cfg, tokens, losses, pm.lora, start_adapters)
        dist.barrier()
    return losses


def compare_with_one_process(cfg: TrainConfig, tokens: torch.Tensor, losses: list[float],
                             lora: object | None = None,
                             adapters: dict[str, torch.Tensor] | None = None) -> float:
    """Train the same initial model on the same batches in this one process, with plain
    transformers (and peft's own LoRA, from the parallel run's initial ``adapters``) and
    the same rule after a plain backward (LOMO and AdaLomo inside it), clipped the same
    way; print how far the parallel losses are."""
    from collie_compile.optim.optimizers import single_process_optimizer
    from collie_compile.runtime.options import ADAPTER_PREFIX

    torch.manual_seed(cfg.seed)
    model = build_model(load_config(cfg.model), device="cpu", dtype=torch_dtype(cfg.dtype))
    if lora is not None:
        from peft import get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, lora)
        set_peft_model_state_dict(model, {ADAPTER_PREFIX + k: v
                                          for k, v in (adapters or {}).items()})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = single_process_optimizer(cfg.optimizer, params, cfg.lr)
    inside = hasattr(opt, "engine")  # LOMO, AdaLomo: clipping is the engine's
    if inside and cfg.max_grad_norm is not None:
        opt.engine.max_grad_norm, opt.engine.clip_mode = cfg.max_grad_norm, cfg.clip_mode
    gen = torch.Generator().manual_seed(cfg.seed)
    worst = 0.0
    for ours in losses:
        ids = windows(tokens, cfg.global_batch_size, cfg.seq_len, gen)

        def closure(ids: torch.Tensor = ids) -> float:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.item()

        if inside:
            loss = opt.step(closure) if cfg.max_grad_norm is not None else closure()
        else:
            loss = closure()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        worst = max(worst, abs(ours - loss) / abs(loss))
    print(f"one process, same model and batches: loss {losses[0]:.4f} -> {loss:.4f}; "
          f"largest relative difference from the parallel run {worst:.1e} over "
          f"{len(losses)} steps", flush=True)
    return worst
