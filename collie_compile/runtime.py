"""``parallelize``: a plan turned into per-rank programs that train.

Every rank captures the model at the plan's micro-batch shape, applies the passes for
its coordinates in the (pp, dp, tp) mesh (tensor_parallel -> outline_blocks ->
pipeline_split -> recompute -> data_parallel), and drives its stages: a plain loop over
micro-batches when pp = 1, a torch.distributed.pipelining schedule otherwise.

Loss convention: each micro-batch contributes sum(token losses) / (valid tokens in the
global batch) and gradients are summed over micro-batches and data-parallel ranks, so
loss and gradients equal those of one process on the whole batch with HF's mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx

from . import distributed as cdist
from .annotate import annotate
from .capture import capture_static
from .errors import CollieError
from .models import model_name
from .passes.data_parallel import data_parallel
from .passes.outline_blocks import outline_blocks
from .passes.pipeline_split import pipeline_split
from .passes.recompute import recompute as recompute_pass
from .passes.tensor_parallel import tensor_parallel
from .plan import Candidate, Plan

IGNORE_INDEX = -100
ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-3, "lion": 1e-4}


@dataclass
class Coordinates:
    """Where this rank sits in the (pp, dp, tp) mesh."""

    pp: int
    dp: int
    tp: int


def parallelize(model: torch.nn.Module, gpus: int | None = None,
                plan: str | Plan | Path = "auto", optimizer: str = "adamw",
                lr: float | None = None, optimizer_kwargs: dict | None = None,
                seq_len: int | None = None, global_batch_size: int | None = None,
                gpu: str = "a100-80gb", dtype: str = "fp32", dp: int | None = None,
                tp: int | None = None, pp: int | None = None, zero: int | None = None,
                micro_batch_size: int | None = None, schedule: str | None = None,
                recompute: str | None = None) -> ParallelModel:
    """Split ``model`` over the ranks of this torchrun job and return its trainer.

    Call once on every rank with the same arguments. ``plan`` is ``"auto"`` (solve it
    with the pins given: dp, tp, pp, zero, micro_batch_size, schedule, recompute), a
    :class:`Plan`, or a plan JSON file from ``collie-compile plan --out``.
    """
    cdist.ensure_initialized()
    world = dist.get_world_size()
    cfg = model.config
    name = model_name(cfg)

    def resolve() -> Plan:
        if gpus is not None and gpus != world:
            raise CollieError(f"gpus={gpus} but this job has {world} processes; launch "
                              f"torchrun with --nproc-per-node (x nodes) = {gpus}, or pass "
                              f"gpus={world}")
        p = _resolve_plan(plan, cfg, name, world, gpu, optimizer, dtype, seq_len,
                          global_batch_size, dict(dp=dp, tp=tp, pp=pp, zero=zero,
                                                  micro_batch_size=micro_batch_size,
                                                  schedule=schedule, recompute=recompute))
        return p

    # Rank 0's plan for everyone: the solver is deterministic, but one answer is safer.
    solved = cdist.agree(resolve)
    chosen_plan = Plan.from_json(cdist.broadcast_text(solved.to_json()))
    return ParallelModel(model, chosen_plan, optimizer, lr, optimizer_kwargs or {})


def _resolve_plan(plan: str | Plan | Path, cfg: object, name: str, world: int, gpu: str,
                  optimizer: str, dtype: str, seq_len: int | None,
                  global_batch_size: int | None, pins: dict) -> Plan:
    from .planner import plan as solve

    if isinstance(plan, Plan):
        p = plan
    elif str(plan) == "auto":
        p = solve(cfg, gpus=world, gpu=gpu, seq_len=seq_len,
                  global_batch_size=global_batch_size, optimizer=optimizer,
                  dtype="fp32" if dtype == "fp32" else dtype, **pins)
        if not p.feasible:
            raise CollieError(f"no plan fits {world} x {p.gpu}: the closest is "
                              f"{p.shortfall_bytes / 2**30:.1f} GiB over; "
                              f"{'; '.join(p.suggestions) or 'use more GPUs'}")
    else:
        p = Plan.load(plan)
    if p.model != name:
        raise CollieError(f"the plan is for model {p.model!r} but this model is {name!r}; "
                          "plan this model (collie-compile plan) or pass plan='auto'")
    c = p.chosen
    layers = int(cfg.num_hidden_layers)
    if c is None or len(c.recompute) != layers:
        raise CollieError(f"the plan's layer count does not match {name}'s {layers} layers")
    if c.dp * c.tp * c.pp != world:
        raise CollieError(f"the plan is for {c.dp * c.tp * c.pp} GPUs (dp={c.dp} tp={c.tp} "
                          f"pp={c.pp}) but this job has {world} processes")
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if heads % c.tp or (kv % c.tp and c.tp % kv):
        raise CollieError(f"tp={c.tp} does not divide {name}'s {heads} attention heads / "
                          f"{kv} KV heads; use a tp that divides them")
    return p


def chunk_layers(c: Candidate) -> list[list[int]]:
    """[first, last] block of each pipeline chunk: the plan's stages, or with interleaving
    pp x v balanced chunks, chunk k on pp rank k % pp."""
    if c.virtual_stages == 1:
        return [list(s) for s in c.stages]
    layers = c.stages[-1][1] + 1
    n = c.pp * c.virtual_stages
    sizes = [layers // n + (k < layers % n) for k in range(n)]
    out, first = [], 0
    for s in sizes:
        out.append([first, first + s - 1])
        first += s
    return out


class ParallelModel:
    """The per-rank program: ``train_step`` over the global batch, ``forward`` for logits,
    and checkpointing (see :mod:`collie_compile.checkpoint`)."""

    def __init__(self, model: torch.nn.Module, plan: Plan, optimizer: str,
                 lr: float | None, optimizer_kwargs: dict) -> None:
        self.plan, self.config = plan, model.config
        c = self.chosen = plan.chosen
        self.mesh = cdist.build_mesh(c.pp, c.dp, c.tp)
        self.coords = Coordinates(*(self.mesh.get_local_rank(d) for d in ("pp", "dp", "tp")))
        self.micro_batch, self.seq = c.micro_batch_size, plan.seq_len
        self.num_microbatches = c.num_microbatches
        self.global_batch = plan.global_batch_size
        self.device = cdist.device()
        self.stages, self.stage_ids, self.prefix = self._build(model)
        self.optimizer = self._make_optimizer(optimizer, lr, optimizer_kwargs)
        self.schedule = self._make_schedule() if c.pp > 1 else None
        self.step_count = 0

    # -- building -------------------------------------------------------------------

    def _build(self, model: torch.nn.Module) -> tuple[list[fx.GraphModule], list[int], str]:
        c = self.chosen
        model.train()
        ids = torch.zeros(self.micro_batch, self.seq, dtype=torch.long)
        ep = cdist.agree(lambda: capture_static(model, ids))
        ag = annotate(ep, model)
        gm = ag.gm
        for n in list(gm.graph.nodes):  # shape guards of a static capture: not needed
            if n.op == "call_module" and n.target == "_guards_fn":
                gm.graph.erase_node(n)
        layout = {i.name: "column" if i.sharded else "row" for i in ag.nodes.values()
                  if i.kind == "linear" and i.block is not None}
        cfg = self.config
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        gm = cdist.agree(lambda: tensor_parallel(
            gm, layout, self.mesh.get_group("tp"), self.coords.tp, c.tp, heads, kv, head_dim))
        self.tp_shards = dict(gm.meta["tp_shards"])
        partial = dict(gm.meta["partial_grads"])
        sets = sorted({tuple(s) for v in partial.values() for s in v})
        groups = cdist.subgroups(self.mesh, [list(s) for s in sets]) if sets else {}
        self.partial_grads = {k: next(groups[tuple(s)] for s in v if tuple(s) in groups)
                              for k, v in partial.items()}
        gm = outline_blocks(gm, ag.block_prefix)
        chunks = chunk_layers(c)
        parts = pipeline_split(gm, ag.block_prefix, chunks)
        mine = [k for k in range(len(parts)) if k % c.pp == self.coords.pp]
        stages = []
        dp_mesh = self.mesh["dp"] if c.dp > 1 else None
        for k in mine:
            st = recompute_pass(parts[k], ag.block_prefix, c.recompute)
            st = data_parallel(st.to(self.device), dp_mesh, c.zero, ag.block_prefix)
            stages.append(st)
        return stages, mine, ag.block_prefix

    def _make_optimizer(self, name: str, lr: float | None, kwargs: dict
                        ) -> torch.optim.Optimizer:
        params = [p for st in self.stages for p in st.parameters() if p.requires_grad]
        name = name.lower()
        classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
                   "sgd": torch.optim.SGD}
        if name == "lion":
            from .optimizers import Lion
            classes["lion"] = Lion
        if name not in classes:
            raise CollieError(f"optimizer {name!r} is not supported by parallelize yet; use "
                              f"one of {', '.join(sorted(classes))} or lion")
        opts = dict(ADAMW_DEFAULTS) if name == "adamw" else {}
        opts.update(kwargs)
        opts["lr"] = lr if lr is not None else DEFAULT_LR[name]
        if self.chosen.zero == 1 and self.chosen.dp > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(params, optimizer_class=classes[name],
                                           process_group=self.mesh.get_group("dp"), **opts)
        return classes[name](params, **opts)

    def _make_schedule(self) -> object:
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        c = self.chosen
        n = c.pp * c.virtual_stages
        group = self.mesh.get_group("pp")
        pstages = [PipelineStage(st, k, n, self.device, group=group)
                   for st, k in zip(self.stages, self.stage_ids, strict=True)]
        self._loss_scale = 1.0
        loss_fn = self._pipeline_loss
        if c.schedule == "interleaved":
            return ScheduleInterleaved1F1B(pstages, c.num_microbatches, loss_fn=loss_fn,
                                           scale_grads=False)
        cls = ScheduleGPipe if c.schedule == "gpipe" else Schedule1F1B
        return cls(pstages[0], c.num_microbatches, loss_fn=loss_fn, scale_grads=False)

    # -- training ---------------------------------------------------------------------

    def _pipeline_loss(self, out: object, target: torch.Tensor) -> torch.Tensor:
        return token_loss(out, target) * self._loss_scale

    def _local_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch.get("labels", ids)).clone()
        mask = batch.get("attention_mask")
        if ids.dim() != 2 or tuple(ids.shape) != (self.global_batch, self.seq):
            raise CollieError(f"input_ids must be [global_batch, seq] = "
                              f"[{self.global_batch}, {self.seq}] as planned, got "
                              f"{list(ids.shape)}")
        if mask is not None:
            mask = torch.as_tensor(mask).bool()
            # Right padding under a causal mask changes no real token: only its labels go.
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise CollieError("attention_mask has padding before real tokens (left "
                                  "padding); pad on the right or pack sequences")
            labels[~mask] = IGNORE_INDEX
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        tokens = int((targets != IGNORE_INDEX).sum())
        share = self.global_batch // self.chosen.dp
        rows = slice(self.coords.dp * share, (self.coords.dp + 1) * share)
        return ids[rows].to(self.device), targets[rows].to(self.device), tokens

    def train_step(self, batch: dict) -> float:
        """Forward, backward and one optimizer step over the global batch; returns its mean
        token loss (the same on every rank)."""
        ids, targets, tokens = self._local_batch(batch)
        scale = 1.0 / max(tokens, 1)
        for st in self.stages:
            if "grad_reducer" in st.meta:
                st.meta["grad_reducer"].accumulations = self.num_microbatches
        total = torch.zeros((), dtype=torch.float32)
        if self.schedule is None:
            st = self.stages[0]
            fsdp = hasattr(st, "set_requires_gradient_sync")
            for i, (x, y) in enumerate(zip(ids.chunk(self.num_microbatches),
                                           targets.chunk(self.num_microbatches), strict=True)):
                if fsdp:
                    st.set_requires_gradient_sync(i == self.num_microbatches - 1)
                loss = token_loss(st(x), y) * scale
                loss.backward()
                total += loss.detach().float().cpu()
        else:
            self._loss_scale = scale
            losses: list[torch.Tensor] = []
            first, last = 0 in self.stage_ids, self._is_last()
            args = (ids,) if first else ()
            kwargs = {"target": targets, "losses": losses} if last else {}
            self.schedule.step(*args, **kwargs)
            total += sum((x.detach().float().cpu() for x in losses), torch.zeros(()))
        self._finish_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return self._global_loss(total)

    def _is_last(self) -> bool:
        return self.chosen.pp * self.chosen.virtual_stages - 1 in self.stage_ids

    def _finish_grads(self) -> None:
        for st in self.stages:
            if "grad_reducer" in st.meta:
                st.meta["grad_reducer"].finish()
            for name, p in st.named_parameters():
                group = self.partial_grads.get(name)
                if group is not None and p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    dist.all_reduce(g, group=group)

    def _global_loss(self, total: torch.Tensor) -> float:
        """Sum of every dp rank's share on the last stage, given to every rank."""
        if not self._is_last():
            total = torch.zeros(())
        elif self.coords.tp != 0:
            total = torch.zeros(())  # tp peers hold the same value: count it once
        total = total.to(self.device)
        dist.all_reduce(total)
        return float(total)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids`` of the planned shape [global_batch, seq], gathered on
        every rank."""
        ids = torch.as_tensor(input_ids)
        if tuple(ids.shape) != (self.global_batch, self.seq):
            raise CollieError(f"forward takes the planned shape [{self.global_batch}, "
                              f"{self.seq}], got {list(ids.shape)}")
        share = self.global_batch // self.chosen.dp
        mine = ids[self.coords.dp * share:(self.coords.dp + 1) * share].to(self.device)
        vocab = int(self.config.vocab_size)
        local = torch.zeros(share, self.seq, vocab, device=self.device)
        if self.schedule is None:
            for i, x in enumerate(mine.split(self.micro_batch)):
                local[i * self.micro_batch:(i + 1) * self.micro_batch] = _first(self.stages[0](x))
        else:
            out = self.schedule.eval(mine) if 0 in self.stage_ids else self.schedule.eval()
            if self._is_last():
                local.copy_(_first(out))
            if self.coords.tp != 0 or not self._is_last():
                local.zero_()
        full = torch.zeros(self.global_batch, self.seq, vocab, device=self.device)
        full[self.coords.dp * share:(self.coords.dp + 1) * share] = local
        dist.all_reduce(full)
        return full.cpu()

    def named_stage_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, local tensor) of every parameter this rank holds."""
        out = []
        for st in self.stages:
            for name, p in st.named_parameters():
                out.append((name, p))
        return out


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def token_loss(out: object, target: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over ``target`` positions that count."""
    logits = _first(out)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
