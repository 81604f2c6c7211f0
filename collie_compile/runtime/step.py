"""Stepping a rank program: the global batch cut into this rank's micro-batches, forward
and backward (a plain loop when pp = 1, a torch.distributed.pipelining schedule
otherwise), gradients completed over tp and tied copies, clipped, and the update.

Loss convention: each micro-batch contributes sum(token losses) / (valid tokens in the
global batch) and gradients are summed over micro-batches and data-parallel ranks, so
loss and gradients equal those of one process on the whole batch with HF's mean loss.
A mixture of experts with ``output_router_logits`` adds its routers' loss over each
micro-batch (:mod:`collie_compile.runtime.router_loss`) divided by the number of
micro-batches in the step over all data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError
from collie_compile.passes.collectives import vocab_parallel_cross_entropy
from collie_compile.passes.data_parallel import grad_reducers
from collie_compile.runtime.adalora import AdaLoraSteps
from collie_compile.runtime.program import RankProgram
from collie_compile.runtime.updates import Updates

IGNORE_INDEX = -100


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _labels(target: torch.Tensor) -> torch.Tensor:
    """The next-token targets of a micro-batch's target (which also holds the padding
    mask, as [..., 2], where the router loss needs it)."""
    return target[..., 0] if target.dim() == 3 else target


def token_loss(out: object, target: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over ``target`` positions that count."""
    logits, target = _first(out), _labels(target)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def check_batch_keys(batch: dict) -> None:
    """Refuse a batch key the program would not use (it used to be ignored in silence)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise CollieError("a batch is a dict with input_ids (and optionally labels, "
                          "attention_mask or position_ids)")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise CollieError(f"the batch holds {', '.join(map(str, unknown))}, which training "
                          f"does not use (it takes {', '.join(BATCH_KEYS)}); remove "
                          f"{'it' if len(unknown) == 1 else 'them'}")


def check_positions(batch: dict, ids: torch.Tensor, takes_positions: bool,
                    max_positions: int | None) -> torch.Tensor | None:
    """The batch's ``position_ids`` checked (the program's default, 0..seq-1 in every
    row, where it takes them and the batch has none), or None where the program does not
    take them. Positions that restart within a row start another document, which then
    attends only to itself (``DataCollatorWithFlattening``'s batches)."""
    pos = batch.get("position_ids")
    if pos is None:
        if not takes_positions:
            return None
        return torch.arange(ids.shape[1]).expand(ids.shape).contiguous()
    if not takes_positions:
        raise CollieError("the batch holds position_ids but this model was parallelized "
                          "for one sequence per row: pass position_ids=True to "
                          "parallelize (train: --separate-documents) to train on "
                          "documents packed into rows, each attending only to itself")
    if "attention_mask" in batch:
        # transformers reads position_ids as packed documents only without a mask
        raise CollieError("give position_ids (packed documents) or attention_mask (padded "
                          "rows), not both: with position_ids a row's documents are told "
                          "apart by their positions, so pack rows without padding, or "
                          "label padding -100")
    pos = torch.as_tensor(pos)
    if pos.is_floating_point() or pos.dtype == torch.bool:
        raise CollieError(f"position_ids must be integers, got {pos.dtype}")
    if tuple(pos.shape) != tuple(ids.shape):
        raise CollieError(f"position_ids must have the shape of input_ids {list(ids.shape)}, "
                          f"got {list(pos.shape)}")
    if int(pos.min()) < 0:
        raise CollieError(f"position_ids hold {int(pos.min())}: positions count from 0, "
                          "restarting at 0 with each document")
    if max_positions is not None and int(pos.max()) >= max_positions:
        raise CollieError(f"position_ids hold {int(pos.max())}, past the model's "
                          f"{max_positions} positions (max_position_embeddings)")
    return pos.long()


class Stepper:
    """Runs ``program``'s training steps and forward passes with ``updates``."""

    def __init__(self, program: RankProgram, updates: Updates,
                 max_grad_norm: float | None = None, adalora: AdaLoraSteps | None = None
                 ) -> None:
        self.program, self.updates, self.adalora = program, updates, adalora
        self.max_grad_norm, self.last_grad_norm = max_grad_norm, None
        c = program.chosen
        self.micro_batch, self.seq = c.micro_batch_size, program.plan.seq_len
        self.num_microbatches = c.num_microbatches
        self.global_batch = program.plan.global_batch_size
        self._token_scale = self._aux_scale = 1.0
        self.schedule = self._make_schedule() if c.pp > 1 else None
        self.step_count = 0

    def _make_schedule(self) -> object:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        prog, c = self.program, self.program.chosen
        n = c.pp * c.virtual_stages
        group = prog.mesh.get_group("pp")
        pstages = [PipelineStage(st, k, n, prog.device, group=group)
                   for st, k in zip(prog.stages, prog.stage_ids, strict=True)]
        loss_fn = self._micro_batch_loss
        if c.schedule == "interleaved":
            return ScheduleInterleaved1F1B(pstages, c.num_microbatches, loss_fn=loss_fn,
                                           scale_grads=False)
        cls = ScheduleGPipe if c.schedule == "gpipe" else Schedule1F1B
        return cls(pstages[0], c.num_microbatches, loss_fn=loss_fn, scale_grads=False)

    # -- training ---------------------------------------------------------------------

    def _micro_batch_loss(self, out: object, target: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step's loss: its token losses over the step's
        tokens, and its router loss (where the model has one) over the step's
        micro-batches."""
        loss = self._token_loss(out, target) * self._token_scale
        aux = self.program.router_loss
        if aux is not None:
            loss = loss + aux(out[1:], target[..., 1]) * self._aux_scale
        return loss

    def _token_loss(self, out: object, target: torch.Tensor) -> torch.Tensor:
        prog = self.program
        if prog.vocab_slice is None:
            return token_loss(out, target)
        return vocab_parallel_cross_entropy(_first(out), _labels(target), prog.vocab_slice[0],
                                            prog.mesh.get_group("tp"), IGNORE_INDEX)

    def _local_batch(self, batch: dict, local: bool = False
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int]:
        """This rank's rows of ``batch`` (the global batch; with ``local`` only this dp
        rank's share of it) as the program's inputs (input_ids, and position_ids where it
        takes them), their next-token targets, and the number of targets that count in
        the whole global batch."""
        share = self.global_batch // self.program.chosen.dp
        rows = share if local else self.global_batch
        try:
            inputs, targets = self._targets(batch, rows, local)
            problem = None
        except CollieError as e:
            problem = e
        device = self.program.device
        if not local:
            if problem is not None:  # every rank has the same batch: all raise alike
                raise problem
            dp = self.program.coords.dp
            tokens = int((_labels(targets) != IGNORE_INDEX).sum())
            rows_here = slice(dp * share, (dp + 1) * share)
            return (tuple(t[rows_here].to(device) for t in inputs),
                    targets[rows_here].to(device), tokens)
        # Each replica checked its own rows: the count's all-reduce carries whether any
        # refused them, so that none goes on to a collective the others skip.
        count = torch.tensor([0 if problem else int((_labels(targets) != IGNORE_INDEX).sum()),
                              int(problem is not None)], device=device)
        if self.program.chosen.dp > 1:
            dist.all_reduce(count, group=self.program.mesh.get_group("dp"))
        if problem is not None:
            raise problem
        if int(count[1]):
            raise CollieError("another data-parallel rank's share of the batch was refused "
                              "(that rank prints why)")
        return tuple(t.to(device) for t in inputs), targets.to(device), int(count[0])

    def _targets(self, batch: dict, rows: int, local: bool
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The program's inputs (``input_ids``, ``position_ids`` where it takes them) and
        the next-token targets (-100: not counted), checked; with a router loss, the
        targets stacked with the padding mask (1: a real token) as [..., 2]."""
        check_batch_keys(batch)
        ids = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch.get("labels", ids)).clone()
        mask = batch.get("attention_mask")
        if ids.dim() != 2 or tuple(ids.shape) != (rows, self.seq):
            what = "this data-parallel rank's share" if local else "[global_batch, seq]"
            raise CollieError(f"input_ids must be {what} = [{rows}, {self.seq}] as planned, "
                              f"got {list(ids.shape)}")
        if tuple(labels.shape) != tuple(ids.shape):
            raise CollieError(f"labels must have the shape of input_ids {list(ids.shape)}, "
                              f"got {list(labels.shape)}")
        vocab = int(self.program.config.vocab_size)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise CollieError(f"input_ids hold token id {bad}, outside the model's vocabulary "
                              f"of {vocab}; tokenize with the model's own tokenizer")
        if mask is not None:
            mask = torch.as_tensor(mask).bool()
            # Right padding under a causal mask changes no real token: only its labels go.
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise CollieError("attention_mask has padding before real tokens (left "
                                  "padding); pad on the right or pack sequences")
            labels[~mask] = IGNORE_INDEX
        pos = check_positions(batch, ids, self.program.takes_positions,
                              getattr(self.program.config, "max_position_embeddings", None))
        if self.program.virtual_tokens:  # its logits are already shifted (models.prompts)
            targets = labels
        else:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
        # a document's last token predicting the next one's first counts, as in
        # transformers: DataCollatorWithFlattening labels each document's first token -100
        if self.program.router_loss is not None:  # it leaves padding out, as HF's does
            real = torch.ones_like(ids) if mask is None else mask.long()
            targets = torch.stack([targets, real], dim=-1)
        return ((ids,) if pos is None else (ids, pos)), targets

    def train_step(self, batch: dict, local: bool = False) -> float | None:
        """Forward, backward and one optimizer step over the global batch (``local``: this
        rank's dp share of it); returns its mean token loss (the same on every rank), or
        None, with nothing run or updated, when no token of the batch counts in the loss
        (a loss of 0 would pass for a perfect step, and weight decay would still act)."""
        inputs, targets, tokens = self._local_batch(batch, local)
        if tokens == 0:
            return None
        fused, optimizer = self.updates.fused, self.updates.optimizer
        orth = 0.0  # AdaLoRA's regulariser, part of the loss
        if fused is not None:  # updates happen inside backward
            total = fused.step(lambda: self._forward_backward(
                inputs, targets, tokens, fused.loss_scale))
            self.last_grad_norm = fused.last_grad_norm
        else:
            # Gradients of the previous step stay readable until here (full_state_dict).
            optimizer.zero_grad(set_to_none=True)
            total = self._forward_backward(inputs, targets, tokens)
            self._sum_partial_grads()
            self._sum_tied_grads()
            orth = self.adalora.add_orth_grads() if self.adalora is not None else 0.0
            if self.max_grad_norm is not None:
                self.last_grad_norm = self.clip_grad_norm(self.max_grad_norm)
            optimizer.step()
            if self.adalora is not None:
                self.adalora.allocate(self.step_count)
        self.step_count += 1
        return self._global_loss(total) + orth

    def _forward_backward(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
                          tokens: int, loss_scale: float = 1.0) -> torch.Tensor:
        """Every micro-batch forward and backward (gradients summed and reduced over dp);
        returns this rank's share of the unscaled loss."""
        prog = self.program
        self._token_scale = loss_scale / max(tokens, 1)
        self._aux_scale = loss_scale / (self.num_microbatches * prog.chosen.dp)
        reducers = [r for st in prog.stages for r in grad_reducers(st)]
        for reducer in reducers:
            reducer.accumulations = self.num_microbatches
        total = torch.zeros((), dtype=torch.float32)
        if self.schedule is None:
            st, m = prog.stages[0], self.num_microbatches
            for *x, y in zip(*(t.chunk(m) for t in inputs), targets.chunk(m), strict=True):
                loss = self._micro_batch_loss(st(*x), y)
                loss.backward()
                total += loss.detach().float().cpu()
        else:
            losses: list[torch.Tensor] = []
            first, last = 0 in prog.stage_ids, prog.is_last()
            args = inputs if first else ()
            kwargs = {"target": targets, "losses": losses} if last else {}
            # the losses come through the loss function: keeping every micro-batch's
            # logits for a merged return would hold m x [b, s, V] on the last stage
            self.schedule.step(*args, return_outputs=False, **kwargs)
            total += sum((x.detach().float().cpu() for x in losses), torch.zeros(()))
        for reducer in reducers:
            reducer.finish()
        return total / loss_scale

    def _sum_partial_grads(self) -> None:
        """Tensor-parallel peers that each hold a partial gradient (GQA-shared KV heads,
        LoRA's replicated factor) add them up."""
        self._sum_grads(self.program.partial_groups)

    def _sum_tied_grads(self) -> None:
        """Copies of a tied weight on several pipeline stages add up their gradients, so
        every copy takes the step the one weight would."""
        self._sum_grads(self.program.tied_groups)

    def _sum_grads(self, groups: dict[str, object]) -> None:
        for st in self.program.stages:
            for name, p in st.named_parameters():
                group = groups.get(name)
                if group is not None and p.grad is not None:
                    dist.all_reduce(local_tensor(p.grad), group=group)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)), as
        ``torch.nn.utils.clip_grad_norm_`` does, with ‖g‖ the norm of the whole model's
        gradient: each box counted once over tp, dp and pp. Returns ‖g‖."""
        prog = self.program
        total = torch.zeros((), dtype=torch.float64, device=prog.device)
        local = prog.local_parameters()
        for name, p in local.items():
            if p.grad is not None and prog.writes(name, p):
                total += local_tensor(p.grad).double().pow(2).sum()
        dist.all_reduce(total)
        norm = float(total.sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p in local.values():
            if p.grad is not None:
                local_tensor(p.grad).mul_(coef)
        return norm

    def _global_loss(self, total: torch.Tensor) -> float:
        """Sum of every dp rank's share on the last stage, given to every rank."""
        if not self.program.is_last() or self.program.coords.tp != 0:
            total = torch.zeros(())  # tp peers hold the same value: count it once
        total = total.to(self.program.device)
        dist.all_reduce(total)
        return float(total)

    # -- inference ----------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self, batch: dict, local: bool = False) -> tuple[float, int]:
        """Sum of the token losses over ``batch`` (as :meth:`train_step` takes it) and how
        many tokens counted, the same on every rank; forward only: no gradient, so no
        update either, inside backward or after it."""
        inputs, targets, tokens = self._local_batch(batch, local)
        total = torch.zeros((), dtype=torch.float32)
        b = self.micro_batch
        with self._evaluating():
            for *x, y in zip(*(t.split(b) for t in inputs), targets.split(b), strict=True):
                out = self._forward_micro_batch(tuple(x))
                if out is not None:  # the last stage: every tp rank takes part in the loss
                    total += self._token_loss(out, y).float().cpu()
        return self._global_loss(total), tokens


    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits for ``input_ids`` of the planned shape [global_batch, seq] (and their
        ``position_ids``, where the program takes them), gathered on every rank."""
        prog = self.program
        ids = torch.as_tensor(input_ids)
        if tuple(ids.shape) != (self.global_batch, self.seq):
            raise CollieError(f"forward takes the planned shape [{self.global_batch}, "
                              f"{self.seq}], got {list(ids.shape)}")
        batch = {"input_ids": ids} | ({} if position_ids is None
                                      else {"position_ids": position_ids})
        pos = check_positions(batch, ids, prog.takes_positions,
                              getattr(prog.config, "max_position_embeddings", None))
        share = self.global_batch // prog.chosen.dp
        dp, device = prog.coords.dp, prog.device
        rows = slice(dp * share, (dp + 1) * share)
        mine = [t[rows].to(device) for t in ((ids,) if pos is None else (ids, pos))]
        vocab = int(prog.config.vocab_size)
        local = torch.zeros(share, self.seq, vocab, device=device)
        with self._evaluating():
            for i, x in enumerate(zip(*(t.split(self.micro_batch) for t in mine),
                                      strict=True)):
                out = self._forward_micro_batch(x)
                rows = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
                if out is not None and prog.vocab_slice is not None:  # tp: its vocab slice
                    local[rows, :, prog.vocab_slice[0]:prog.vocab_slice[1]] = out
                elif out is not None and prog.coords.tp == 0:
                    local[rows] = out
        full = torch.zeros(self.global_batch, self.seq, vocab, device=device)
        full[dp * share:(dp + 1) * share] = local
        dist.all_reduce(full)
        return full.cpu()

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The stages in eval mode (no dropout: passes.dropout), as HF's ``model.eval()``;
        back in training mode after."""
        for st in self.program.stages:
            st.eval()
        try:
            yield
        finally:
            for st in self.program.stages:
                st.train()

    def _forward_micro_batch(self, x: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Run one micro-batch (the first stage's inputs) through the stages in order,
        passing boundary tensors point to point along the pp group; the logits on the
        last stage's ranks."""
        prog, c = self.program, self.program.chosen
        n = c.pp * c.virtual_stages
        dp, tp = prog.coords.dp, prog.coords.tp
        peer = [int(prog.mesh.mesh[j, dp, tp]) for j in range(c.pp)]
        acts: tuple = x
        for k in range(n):
            here, prev = k % c.pp, (k - 1) % c.pp
            if here != prog.coords.pp:
                if prev == prog.coords.pp and k > 0:
                    for t in acts:
                        dist.send(t.contiguous(), dst=peer[here])
                continue
            if k > 0 and prev != here:
                acts = tuple(torch.empty(shape, dtype=dtype, device=prog.device)
                             for shape, dtype in prog.stage_inputs[k])
                for t in acts:
                    dist.recv(t, src=peer[prev])
            out = prog.stages[prog.stage_ids.index(k)](*acts)
            acts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return acts[0] if prog.is_last() else None
