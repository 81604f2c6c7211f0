"""``collie-compile train``: the :class:`~collie_compile.training.trainer.Trainer` on
files, under torchrun.

Data (``--data``: text, JSON Lines or Parquet files, or folders of them) becomes tokens
with a local Hugging Face tokenizer (``--tokenizer DIR``) or, with none, as UTF-8 bytes
(ids 0-255: every preset's vocabulary covers them, and nothing is downloaded). Everything
the user gave is checked, and the data tokenized into the cache (by one process per
node; the others read the result), before the model is built: a bad flag, file or record
is one line and no GPU work. Then each data-parallel replica reads only its rows of each
step's batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from collie_compile.config import Pins
from collie_compile.data.packing import IGNORE_INDEX, PackedTokens
from collie_compile.data.records import ON_ERROR
from collie_compile.data.tokenize import Encoder, tokenized, tokenizer_files
from collie_compile.dtypes import torch_dtype
from collie_compile.errors import CollieError, flag
from collie_compile.models.prompts import ENCODER, is_prompt_method
from collie_compile.models.registry import build_model, load_config
from collie_compile.optim.optimizers import optimizer_options
from collie_compile.optim.schedules import LRSchedule
from collie_compile.passes.lora import is_adapter, is_svd
from collie_compile.planner.result import Plan
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime.options import read_peft_config
from collie_compile.training.checkpoints import complete_checkpoints, lock_output
from collie_compile.training.metrics import TENSORBOARD_MISSING, tensorboard_installed
from collie_compile.training.trainer import Trainer, check_options

FINAL = "final"  # the trained model's folder under --output
# --check's largest relative loss difference in fp32 (the tests see < 1e-5); 16-bit runs
# are reported, not judged
CHECK_TOLERANCE = 1e-4


@dataclass
class TrainConfig:
    """What ``collie-compile train`` was asked; None: the plan file's value, or the
    default (seq_len 64, global batch 8, adamw, fp32) with plan "auto"."""

    model: str
    data: list[str]
    steps: int = 20
    seq_len: int | None = None
    global_batch_size: int | None = None
    optimizer: str | None = None
    dtype: str | None = None
    lr: float | None = None
    plan: str = "auto"
    gpu: str | None = None  # the auto plan's hardware: this machine's GPU by default
    tokenizer: str | None = None
    text_field: str | None = None  # the text of JSONL/Parquet records (None: detected)
    bad_records: str = "fatal"  # or "skip"
    eval_data: list[str] | None = None
    eval_split: float | None = None  # held out of --data instead
    eval_every: int | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None  # wsd
    min_lr: float = 0.0
    output: str | None = None  # checkpoints, metrics, the final model; resumes from it
    save_every: int | None = None
    keep_last: int | None = None
    tensorboard: bool | None = None  # None: when installed
    weights: str | None = None
    save: str | None = None
    seed: int = 0
    pins: Pins = field(default_factory=Pins)
    check: bool = False  # rank 0 then trains one process the same way and compares
    lora_rank: int | None = None  # train LoRA adapters only (peft's LoraConfig fields)
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    peft: str | None = None  # a peft config (JSON file): train its adapters only
    peft_adapter: str | None = None  # a saved PEFT adapter to continue
    merge: bool = False  # with adapters, save them folded into plain HF weights
    memory_reserve: float | None = None  # kept free by the auto plan (None: 0.05)
    update_in_backward: bool | None = None  # None: the plan's choice
    max_grad_norm: float | None = None  # clip the global gradient norm
    clip_mode: str = "two-pass"  # inside backward: measure first, or the previous norm
    fresh_optimizer: bool = False  # resume --output's weights under another optimizer
    separate_documents: bool = False  # documents in a row attend only to themselves

    def schedule(self, lr: float) -> LRSchedule:
        return LRSchedule(lr, self.steps, self.lr_schedule, self.warmup_steps,
                          self.decay_steps, self.min_lr)


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
    if cfg.merge and cfg.lora_rank is None and not (cfg.peft or cfg.peft_adapter):
        raise CollieError("--merge folds adapters into the weights; without --lora-rank, "
                          "--peft or --peft-adapter there are none (--save alone writes the "
                          "whole model)")
    fill = dict(DEFAULTS)
    if cfg.plan.lower() != "auto":
        planned = Plan.load(cfg.plan)
        fill = dict(seq_len=planned.seq_len, global_batch_size=planned.global_batch_size,
                    optimizer=planned.optimizer, dtype=planned.dtype)
        if all(a is None for a in (cfg.lora_rank, cfg.lora_targets, cfg.peft,
                                   cfg.peft_adapter)):
            fill.update(lora_rank=planned.lora_rank, lora_targets=planned.lora_targets)
    cfg = replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})
    check_data_options(cfg)
    return cfg


def check_data_options(cfg: TrainConfig) -> None:
    """The schedule, data, evaluation and output flags, before any work."""
    check_options(cfg.steps, bool(cfg.eval_data or cfg.eval_split), cfg.eval_every,
                  cfg.output, cfg.save_every, cfg.keep_last)
    cfg.schedule(cfg.lr or optimizer_options(cfg.optimizer, None, {})["lr"])
    if cfg.bad_records not in ON_ERROR:
        raise CollieError(f"--bad-records must be one of {', '.join(ON_ERROR)}, got "
                          f"{cfg.bad_records!r}")
    if cfg.eval_data and cfg.eval_split:
        raise CollieError("pass --eval-data or --eval-split, not both")
    if cfg.tensorboard and not tensorboard_installed():
        raise CollieError(TENSORBOARD_MISSING)
    if cfg.output is not None:
        out = Path(cfg.output)
        if out.exists() and not out.is_dir():
            raise CollieError(f"--output {out} is a file; give a folder")
        parent = next(p for p in (out, *out.parents) if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CollieError(f"--output {out}: {parent} is not writable")
        if cfg.check and complete_checkpoints(out):
            raise CollieError(f"--check trains one process from the start, but {out} holds "
                              "checkpoints this run would resume from; use a new --output")
    check_outputs_apart(cfg)


def check_outputs_apart(cfg: TrainConfig) -> None:
    """A folder the run writes (--save, --output) is none it reads from, nor inside or
    around one: a save would replace the base model, or the next run read its own
    checkpoints as data."""
    reads = {"--weights": [cfg.weights], "--tokenizer": [cfg.tokenizer], "MODEL": [cfg.model],
             "--data": cfg.data, "--eval-data": cfg.eval_data or []}
    for out_flag, out in (("--save", cfg.save), ("--output", cfg.output)):
        if out is None:
            continue
        o = Path(out).resolve()
        for in_flag, paths in reads.items():
            for src in paths:
                if src is None or not Path(src).exists():
                    continue  # a preset name, or a missing path refused elsewhere
                i = Path(src).resolve()
                if o == i or i in o.parents or o in i.parents:
                    raise CollieError(f"{out_flag} {out} overlaps {in_flag} {src}, which this "
                                      f"run reads; write to a folder outside it")


def prepare_data(cfg: TrainConfig, vocab_size: int) -> tuple[Path, Path | None]:
    """The cache files of the training and eval data, tokenized by local rank 0 of each
    node (the others wait, then find them in the cache)."""
    def build(log: object = print) -> tuple[Path, Path | None]:
        encoder = Encoder(cfg.tokenizer, vocab_size)
        train_file = tokenized(cfg.data, encoder, cfg.text_field, cfg.bad_records,
                               cfg.eval_split or 0.0, cfg.seed, log)
        eval_file = (tokenized(cfg.eval_data, encoder, cfg.text_field, cfg.bad_records,
                               0.0, cfg.seed, log) if cfg.eval_data else None)
        return train_file, eval_file

    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    quiet = lambda *a: None  # noqa: E731
    mine = cdist.agree(lambda: build(print if dist.get_rank() == 0 else quiet)
                       if first else None)
    return cdist.agree(lambda: mine or build(quiet))  # the others: from the cache


def train(cfg: TrainConfig) -> list[float]:
    """Train and return the loss of every step this run took (on every rank)."""
    from collie_compile.runtime.parallel_model import parallelize

    cdist.ensure_initialized()  # so errors in what follows are agreed, reported once
    cfg = cdist.agree(lambda: resolve(cfg))
    model_cfg = cdist.agree(lambda: load_config(cfg.model))
    train_file, eval_file = prepare_data(cfg, int(model_cfg.vocab_size))
    # one job per --output, for as long as it runs (rank 0 holds the lock)
    lock = cdist.agree(lambda: lock_output(Path(cfg.output))  # noqa: F841 - held
                       if cfg.output and dist.get_rank() == 0 else None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(model_cfg, device="meta" if cfg.weights else "cpu",
                        dtype=torch_dtype(cfg.dtype))
    pm = parallelize(model, plan=cfg.plan, optimizer=cfg.optimizer, lr=cfg.lr,
                     seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size,
                     gpu=cfg.gpu, weights=cfg.weights, lora_rank=cfg.lora_rank,
                     lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                     # AdaLoRA's budget schedule spans the run unless the file says
                     peft=cdist.agree(lambda: read_peft_config(cfg.peft, cfg.steps))
                     if cfg.peft else None,
                     lora_adapter=cfg.peft_adapter, memory_reserve=cfg.memory_reserve,
                     update_in_backward=cfg.update_in_backward,
                     max_grad_norm=cfg.max_grad_norm, clip_mode=cfg.clip_mode,
                     position_ids=cfg.separate_documents, **cfg.pins.given())
    finals = [p for p in (cfg.save, cfg.output and Path(cfg.output) / FINAL) if p]
    for final in finals:  # before the training, not after it
        pm.check_save_path(final, cfg.merge)
    seq = pm.plan.seq_len
    apart = cfg.separate_documents
    data = PackedTokens.from_cache(train_file, "train", seq, cfg.seed, name=" ".join(cfg.data),
                                   separate_documents=apart)
    eval_data = None
    if eval_file:  # its own file: all of it
        eval_data = PackedTokens.from_cache(eval_file, "train", seq, cfg.seed, name="eval",
                                            separate_documents=apart)
    elif cfg.eval_split:
        eval_data = PackedTokens.from_cache(train_file, "eval", seq, cfg.seed,
                                            separate_documents=apart)
    schedule = cfg.schedule(cfg.lr or pm.lr)
    trainer = Trainer(pm, data, steps=cfg.steps, schedule=schedule, eval_data=eval_data,
                      eval_every=cfg.eval_every, output=cfg.output, save_every=cfg.save_every,
                      keep_last=cfg.keep_last, seed=cfg.seed, tensorboard=cfg.tensorboard,
                      fresh_optimizer=cfg.fresh_optimizer)
    # the adapters' random init, for --check's one-process run to start from
    start_adapters = ({k: v for k, v in pm.full_state_dict().items() if is_adapter(k)}
                      if cfg.check and pm.lora is not None else None)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"plan: {pm.chosen.layout_str()}", flush=True)
        if cfg.plan.lower() != "auto":  # what the file decided, train's defaults aside
            p = pm.plan
            print(f"from {cfg.plan}: {p.optimizer}, {p.dtype}, seq {p.seq_len}, global batch "
                  f"{p.global_batch_size}, planned for {p.gpus} x {p.gpu}", flush=True)
        for note in pm.plan.notes:
            print(f"note: {note}", flush=True)
        if pm.lora is not None and not cfg.weights:
            print("note: adapters on randomly initialised weights (no --weights): the adapter "
                  "is saved, the random base it adapts is not; give --weights DIR to adapt a "
                  "pretrained model (or --merge to save the whole model)", flush=True)
    losses = trainer.fit()
    for final in finals:
        pm.save_pretrained(final, merge=cfg.merge, files=beside_the_model(cfg))
        if rank0:
            what = ("a PEFT adapter" if pm.lora is not None and not cfg.merge
                    else "a Hugging Face checkpoint")
            print(f"saved {what} to {final}", flush=True)
    if cfg.check:
        verdict = ""
        if rank0:
            worst = compare_with_one_process(cfg, data, schedule, losses, pm.lora,
                                             start_adapters)
            if cfg.dtype == "fp32" and worst > CHECK_TOLERANCE:
                verdict = (f"--check: the parallel run's losses differ from one process's by "
                           f"{worst:.1e} (relative), more than {CHECK_TOLERANCE:.0e}")
        verdict = cdist.broadcast_text(verdict)
        if verdict:
            raise CollieError(verdict)
    return losses


def beside_the_model(cfg: TrainConfig) -> list[Path]:
    """What a saved model needs to be used as is (``pipeline("text-generation", OUT)``):
    the tokenizer's files and the base's generation config."""
    files = tokenizer_files(cfg.tokenizer) if cfg.tokenizer else []
    if cfg.weights and (Path(cfg.weights) / "generation_config.json").is_file():
        files.append(Path(cfg.weights) / "generation_config.json")
    return files


def compare_with_one_process(cfg: TrainConfig, data: PackedTokens, schedule: LRSchedule,
                             losses: list[float], lora: object | None = None,
                             adapters: dict[str, torch.Tensor] | None = None) -> float:
    """Train the same initial model on the same batches at the same learning rates in
    this one process, with plain transformers (and peft's own adapters, from the parallel
    run's initial ``adapters``; AdaLoRA's ranks allocated by peft after each update)
    and the same rule after a plain backward (LOMO and
    AdaLomo inside it), clipped the same way; print how far the parallel losses are."""
    from collie_compile.optim.optimizers import single_process_optimizer
    from collie_compile.runtime.options import ADAPTER_PREFIX

    torch.manual_seed(cfg.seed)
    if cfg.weights:  # the weights the parallel run started from
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            cfg.weights, config=load_config(cfg.model), dtype=torch_dtype(cfg.dtype))
    else:
        model = build_model(load_config(cfg.model), device="cpu", dtype=torch_dtype(cfg.dtype))
    if lora is not None:
        from peft import get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, lora)
        if is_prompt_method(lora):  # the whole prompt module (P-tuning's encoder too)
            model.prompt_encoder["default"].load_state_dict(
                {k.removeprefix(f"{ENCODER}."): v for k, v in (adapters or {}).items()})
        else:
            set_peft_model_state_dict(model, {ADAPTER_PREFIX + k: v
                                              for k, v in (adapters or {}).items()})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = single_process_optimizer(cfg.optimizer, params, cfg.lr)
    inside = hasattr(opt, "engine")  # LOMO, AdaLomo: clipping is the engine's
    if inside and cfg.max_grad_norm is not None:
        opt.engine.max_grad_norm, opt.engine.clip_mode = cfg.max_grad_norm, cfg.clip_mode
    batch_size = cfg.global_batch_size
    worst = 0.0
    position = 0
    for i, ours in enumerate(losses):
        for group in opt.param_groups:
            group["lr"] = schedule.at(i)
        while True:  # the parallel run skipped batches of which no token counts
            batch = data.batch(position, batch_size)
            position += batch_size
            if (batch["labels"][:, 1:] != IGNORE_INDEX).any():
                break

        def closure(batch: dict = batch) -> float:
            # without a KV cache, as training runs: position_ids then keep documents apart
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            return loss.item()

        if inside:
            loss = opt.step(closure) if cfg.max_grad_norm is not None else closure()
        else:
            loss = closure()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if is_svd(lora):  # the rank budget, from this step's gradients
                model.base_model.update_and_allocate(i)
            opt.zero_grad(set_to_none=True)
        worst = max(worst, abs(ours - loss) / abs(loss))
    print(f"one process, same model and batches: loss {losses[0]:.4f} -> {loss:.4f}; "
          f"largest relative difference from the parallel run {worst:.1e} over "
          f"{len(losses)} steps", flush=True)
    return worst
