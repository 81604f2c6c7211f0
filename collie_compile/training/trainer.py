"""The training loop over a :class:`~collie_compile.runtime.parallel_model.ParallelModel`:
learning-rate schedule, each data-parallel replica reading its rows, evaluation,
periodic checkpoints with automatic resume, metrics.

Call it on every rank alike::

    pm = parallelize(model, optimizer="adamw", lr=2e-5, seq_len=1024, global_batch_size=64)
    Trainer(pm, data, steps=1000, schedule=LRSchedule(2e-5, 1000, "cosine", warmup_steps=50),
            eval_data=held_out, eval_every=100, output="runs/a", save_every=200).fit()

``data`` is a :class:`~collie_compile.data.packing.PackedTokens` (what ``collie-compile
train`` builds from files) or a sequence of tokenized documents (dicts with
``input_ids`` and optionally ``labels``). Started again with the same ``output``,
``fit`` resumes from the newest complete checkpoint there: weights, optimizer states,
schedule, data position and RNG, so the losses go on as if never interrupted, under the
same plan or another one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from collie_compile.data.packing import PackedTokens
from collie_compile.errors import CollieError
from collie_compile.optim.schedules import LRSchedule
from collie_compile.runtime import distributed as cdist
from collie_compile.training import checkpoints as ck
from collie_compile.training.metrics import MetricsLog, has_records, peak_memory_gib


class Trainer:
    """Trains ``model`` for ``steps`` updates (see the module's docstring)."""

    def __init__(self, model: object, data: PackedTokens | object, *, steps: int,
                 schedule: LRSchedule | None = None,
                 eval_data: PackedTokens | object | None = None,
                 eval_every: int | None = None, output: str | Path | None = None,
                 save_every: int | None = None, keep_last: int | None = None,
                 seed: int = 0, tensorboard: bool | None = None,
                 fresh_optimizer: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.pm, self.steps, self.seed = model, steps, seed
        self.fresh_optimizer = fresh_optimizer
        plan = model.plan
        self.seq, self.batch_size = plan.seq_len, plan.global_batch_size
        check_options(steps, eval_data is not None, eval_every, output, save_every, keep_last)
        self.schedule = schedule or LRSchedule(model.lr, steps)
        if self.schedule.steps != steps:
            raise CollieError(f"the schedule spans {self.schedule.steps} steps but the run "
                              f"{steps}")
        self.data = self._packed(data, "training data")
        self.eval_data = self._packed(eval_data, "eval data") if eval_data is not None else None
        # eval data without an interval: evaluate once, at the end
        self.eval_every = eval_every or (steps if eval_data is not None else None)
        self.save_every, self.keep_last = save_every, keep_last
        self.output = Path(output) if output is not None else None
        self.tensorboard = tensorboard
        self.rank0 = dist.get_rank() == 0
        self._print = log
        self.step = self.position = 0

    def _packed(self, data: object, name: str) -> PackedTokens:
        if isinstance(data, PackedTokens):
            if data.seq_len != self.seq:
                raise CollieError(f"the {name} is packed in rows of {data.seq_len} tokens but "
                                  f"the plan's seq_len is {self.seq}")
            return data
        eos = self.pm.program.config.eos_token_id
        eos = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0
        # documents apart where the model takes position_ids (parallelize's position_ids)
        return PackedTokens.from_documents(data, self.seq, int(eos), self.seed,
                                           self.pm.program.takes_positions)

    def say(self, text: str) -> None:
        if self.rank0:
            if self._print is not None:
                self._print(text)
            elif sys.stderr.isatty():
                from tqdm import tqdm

                tqdm.write(text)  # above the progress bar, not through it
            else:
                print(text, flush=True)

    # -- the loop ------------------------------------------------------------------------

    def fit(self) -> list[float]:
        """Train until step ``steps`` (resuming where ``output`` holds a checkpoint);
        returns the losses of the steps this call ran, the same on every rank."""
        self._resume()
        # rank 0 opens the files; a failure there stops every rank, not rank 0 alone
        metrics = cdist.agree(lambda: MetricsLog(self.output, self.rank0, self.step,
                                                 self.tensorboard))
        losses: list[float] = []
        skipped = 0
        rows = self.pm.batch_rows()
        # a terminal gets a progress bar; a log file a line every tenth of the run
        tty = self.rank0 and sys.stderr.isatty()
        bar = tqdm(total=self.steps, initial=self.step, disable=not tty, unit="step")
        every = max(1, self.steps // 10)
        try:
            while self.step < self.steps:
                lr = self.schedule.at(self.step)
                self.pm.set_lr(lr)
                start = time.perf_counter()
                batch = self.data.batch(self.position, self.batch_size, rows)
                loss = self.pm.train_step(batch, local=True)
                seconds = time.perf_counter() - start
                self.position += self.batch_size
                if loss is None:  # no token of it counts: no update, no step, no loss
                    skipped += 1
                    continue
                self.step += 1
                if not math.isfinite(loss):
                    raise CollieError(f"the loss became {loss} at step {self.step}; lower the "
                                      "learning rate", shared=True)
                losses.append(loss)
                record = self._record(loss, lr, seconds)
                metrics.log(record)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if not tty and (self.step % every == 0 or self.step in (1, self.steps)):
                    self.say(f"step {self.step:5d}/{self.steps}  loss {loss:.4f}  lr {lr:.3g}  "
                             f"{record['tokens_per_s']:,.0f} tokens/s")
                if self.eval_every and (self.step % self.eval_every == 0
                                        or self.step == self.steps):
                    metrics.log(self.evaluate())
                if self.save_every and (self.step % self.save_every == 0
                                        or self.step == self.steps):
                    self.save()
            # how the data was shared out: each replica reads 1/dp of every step's rows
            read = [int(x) for x in cdist.all_strings(str(self.data.tokens_read))]
            metrics.log({"step": self.step, "steps_run": len(losses),
                         "batches_skipped": skipped, "data_tokens_read_per_rank": read})
            if skipped:
                self.say(f"note: {skipped} batches held no token that counts in the loss "
                         "(prompts only): skipped, with no update and no step")
        finally:
            bar.close()
            metrics.close()
        return losses

    def _record(self, loss: float, lr: float, seconds: float) -> dict:
        """What ``metrics.jsonl`` says of the step just taken."""
        tokens, c = self.batch_size * self.seq, self.pm.chosen
        return {"step": self.step, "loss": loss, "lr": lr,
                "grad_norm": self.pm.last_grad_norm,
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_gpu": tokens / seconds / dist.get_world_size(),
                # the plan's FLOPs per step against its GPU's peak, at the measured time
                "mfu": c.mfu * c.step_time_s / seconds,
                "peak_mem_gib": peak_memory_gib(),
                "epoch": self.position / self.data.num_sequences}

    def evaluate(self) -> dict:
        """Mean token loss and perplexity over the whole eval set under the training
        plan, forward only (no weight or optimizer state changes)."""
        if self.eval_data is None:
            raise CollieError("evaluate() needs eval_data")
        total, tokens = 0.0, 0
        for batch in self.eval_data.eval_batches(self.batch_size, self.pm.batch_rows()):
            s, n = self.pm.eval_loss(batch, local=True)
            total, tokens = total + s, tokens + n
        loss = total / max(tokens, 1)
        ppl = math.exp(loss) if loss < 700 else math.inf
        self.say(f"eval at step {self.step}: loss {loss:.4f}  perplexity {ppl:.2f}  "
                 f"({tokens:,} tokens)")
        return {"step": self.step, "eval_loss": loss, "eval_ppl": ppl, "eval_tokens": tokens}

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> ck.TrainerState:
        """This run's position (a collective: every rank's RNG state is gathered)."""
        rng = cdist.all_strings(_rng_state())
        # rank 0 writes the state: it alone reads the whole stream to fingerprint it
        return ck.TrainerState(
            step=self.step, position=self.position, schedule=self.schedule.to_dict(),
            seed=self.seed, rng=rng,
            data={"sequences": self.data.num_sequences, "seq_len": self.seq,
                  "global_batch": self.batch_size,
                  "separate_documents": self.data.separate_documents,
                  "digest": self.data.digest() if self.rank0 else ""})

    def save(self) -> Path:
        """A checkpoint of this step under ``output/checkpoints``, then the oldest beyond
        ``keep_last`` go."""
        folder = ck.checkpoint_path(self.output, self.step)
        state = self.state()
        self.pm.save_checkpoint(folder, extra={ck.STATE_FILE: state.to_json()})
        cdist.agree(lambda: ck.prune(self.output, self.keep_last) if self.rank0 else None)
        self.say(f"saved checkpoint {folder}")
        return folder

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint under ``output``, if any."""
        if self.output is None:
            return

        def newest() -> str:
            if self.rank0 and ck.checkpoints_dir(self.output).is_dir():
                for d in ck.clear_partial(self.output):
                    self.say(f"removed {d}, a checkpoint a stopped run did not finish")
            found = ck.complete_checkpoints(self.output)
            if not found and has_records(self.output):
                raise CollieError(f"{self.output} holds the metrics of an earlier run but no "
                                  "checkpoint to resume from: starting over would overwrite "
                                  "them; give a new --output (--save-every N keeps "
                                  "checkpoints to resume from)")
            return str(found[-1][1]) if found else ""

        folder = cdist.broadcast_text(cdist.agree(newest) or "")
        if not folder:
            return
        state = cdist.agree(lambda: ck.read_state(Path(folder)))
        other = cdist.broadcast_text(self._another_run(state) if self.rank0 else "")
        if other:
            raise CollieError(f"{folder} is a checkpoint of another run: {other}; resume "
                              "with that run's settings, or give a new --output")
        self.pm.load_checkpoint(folder, fresh_optimizer=self.fresh_optimizer)
        if self.fresh_optimizer:
            self.say(f"note: the optimizer starts afresh (--fresh-optimizer): {folder}'s "
                     "weights are read, not its optimizer states")
        self.step, self.position = state.step, state.position
        if self.step != self.pm.step_count:
            raise CollieError(f"{folder}: trainer_state.json says step {self.step} but the "
                              f"checkpoint {self.pm.step_count}; the folder is damaged")
        if len(state.rng) == dist.get_world_size():  # else another GPU count: fresh RNG
            _set_rng_state(state.rng[dist.get_rank()])
        if state.schedule and state.schedule != self.schedule.to_dict():
            self.say(f"note: the learning-rate schedule's flags differ from the checkpoint's "
                     f"run, with the same rates for its {self.step} steps; step "
                     f"{self.step + 1} on follows the one given now")
        if state.data.get("global_batch", self.batch_size) != self.batch_size:
            self.say(f"note: the global batch was {state.data['global_batch']} sequences and "
                     f"is {self.batch_size} from step {self.step + 1} on; the data reads on "
                     f"from sequence {self.position}")
        self.say(f"resuming from {folder} (step {self.step} of {self.steps})")

    def _another_run(self, state: ck.TrainerState) -> str:
        """What makes ``state`` a checkpoint of another run than this one ("" if none):
        whatever decides which rows come next or what the past steps were. (The model,
        its dtype and the optimizer are the checkpoint's own checks.)"""
        data = state.data
        if state.seed != self.seed:
            return (f"its seed is {state.seed}, this run's {self.seed} (the seed orders the "
                    "data: another one would skip rows and repeat others)")
        if data.get("seq_len", self.seq) != self.seq:
            return (f"its sequences are {data['seq_len']} tokens, this run's {self.seq} (the "
                    "data position counts sequences)")
        apart = data.get("separate_documents", False)
        if apart != self.data.separate_documents:
            return ("its documents " + ("were kept apart (--separate-documents), this run's "
                                        "attend to those before them in a row" if apart else
                                        "attended to those before them in a row, this run's "
                                        "are kept apart (--separate-documents)"))
        if data.get("digest") and data["digest"] != self.data.digest():
            return ("its training data held other tokens (another file, order, text or "
                    "tokenizer): reading on would take other rows")
        if state.step > self.steps:
            return f"it is at step {state.step}, past this run's --steps {self.steps}"
        if state.schedule:
            old = LRSchedule.from_dict(state.schedule)
            past = next((i for i in range(state.step) if old.at(i) != self.schedule.at(i)),
                        None)
            if past is not None:
                return (f"its learning rate at step {past + 1} was {old.at(past):.3g}, this "
                        f"run's schedule gives {self.schedule.at(past):.3g} there (to train "
                        "on with another schedule, start a new run from its weights: "
                        "--weights OUTPUT/final)")
        return ""


def _rng_state() -> str:
    """torch's CPU (and this CUDA device's) RNG state as text."""
    parts = [torch.get_rng_state()]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_rng_state())
    return ":".join(t.numpy().tobytes().hex() for t in parts)


def _set_rng_state(text: str) -> None:
    parts = [torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8)
             for h in text.split(":")]
    torch.set_rng_state(parts[0])
    if len(parts) > 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state(parts[1])


def check_options(steps: int, has_eval: bool, eval_every: int | None,
                  output: str | Path | None, save_every: int | None,
                  keep_last: int | None) -> None:
    """Options that do not go together, refused before any work."""
    if steps < 1:
        raise CollieError(f"--steps must be a positive integer, got {steps}")
    for name, v in (("--eval-every", eval_every), ("--save-every", save_every),
                    ("--keep-last", keep_last)):
        if v is not None and v < 1:
            raise CollieError(f"{name} must be a positive integer, got {v}")
    if eval_every is not None and not has_eval:
        raise CollieError("--eval-every needs evaluation data: pass --eval-data FILE or "
                          "--eval-split FRACTION")
    if save_every is not None and output is None:
        raise CollieError("--save-every needs --output DIR, where the checkpoints go")
    if keep_last is not None and save_every is None:
        raise CollieError("--keep-last prunes periodic checkpoints; pass --save-every too")
