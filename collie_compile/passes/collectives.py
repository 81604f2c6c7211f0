"""Collective operations as autograd functions, for the passes that split a model.

Tensor parallelism (:mod:`collie_compile.passes.tensor_parallel`): identity forward with
all-reduce backward (in front of a column linear), all-reduce forward with identity
backward (after a row linear), a sum both ways (a statistic of split features), and the
vocabulary-parallel embedding and cross-entropy, which never gather the logits.

Expert parallelism (:mod:`collie_compile.passes.expert_parallel`): the all-to-all that
sends each (token, expert) row to the rank holding its expert, and the one that brings
the results back. Each is the other's backward. Dropless: every row goes where the
router sent it, however uneven, so the result is the one-process result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        return g, None


class _SumOverTP(torch.autograd.Function):
    """The forward of _ReduceFromTP with the backward of _CopyToTP: a sum over tp both
    ways."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _ReduceFromTP.forward(ctx, x, group)

    backward = staticmethod(_CopyToTP.backward)


class SumOverTP(torch.nn.Module):
    """All-reduce (sum) over the tp group forward and backward: a statistic of features
    split between ranks (an RMS norm's sum of squares over all heads), which every rank
    then applies to its own features, so each rank's gradient of it is a part too."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SumOverTP.apply(x, self.group)


class CopyToTP(torch.nn.Module):
    """Identity forward, all-reduce of the input gradient over the tp group backward."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToTP.apply(x, self.group)


class ReduceFromTP(torch.nn.Module):
    """All-reduce (sum) of partial outputs over the tp group forward, identity backward."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromTP.apply(x, self.group)


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding of the ids in ``[start, stop)`` from this rank's rows (others give 0),
    summed over the tp group."""

    def __init__(self, group: dist.ProcessGroup, start: int, stop: int,
                 padding_idx: int = -1) -> None:
        super().__init__()
        self.group, self.start, self.stop = group, start, stop
        # the padding row gets no gradient, as in the unsharded embedding
        self.padding_idx = padding_idx - start if start <= padding_idx < stop else None

    def forward(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = torch.where(outside, 0, ids - self.start)
        out = torch.nn.functional.embedding(local, weight, padding_idx=self.padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromTP.apply(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, target: torch.Tensor, start: int,
                group: dist.ProcessGroup, ignore_index: int) -> torch.Tensor:
        width = logits.shape[-1]
        top = logits.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        # In place where autograd does not look (inside a Function): the loss's extra
        # memory stays at one [tokens, vocab / tp] buffer beside the logits, and at one
        # beside the saved softmax in backward, as the unsharded cross-entropy's.
        z = logits - top.unsqueeze(-1)
        valid = target != ignore_index
        mine = valid & (target >= start) & (target < start + width)
        idx = (target - start).clamp(0, width - 1)
        picked = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(picked, group=group)
        softmax = z.exp_()
        total = softmax.sum(-1)
        dist.all_reduce(total, group=group)
        softmax.div_(total.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, valid)
        return ((total.log() - picked) * valid).sum()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        softmax, idx, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_((valid.to(grad.dtype) * g).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, start: int,
                                 group: dist.ProcessGroup, ignore_index: int = -100
                                 ) -> torch.Tensor:
    """Sum over positions of cross-entropy, from each tp rank's logits for vocabulary ids
    ``[start, start + logits.shape[-1])`` (max, sum of exponentials and the target's
    logit reduced over ``group``): the same as on gathered logits, which never exist."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return _VocabParallelCE.apply(flat, target.reshape(-1), start, group, ignore_index)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    """Rows ``x`` split by ``send`` (rows for each rank of ``group``, in rank order) sent
    to their ranks; rows received, ``recv`` from each rank, in rank order."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                           input_split_sizes=send, group=group)
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, send: list[int], recv: list[int],
                order: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.route = send, recv, order, group
        return _exchange(x, send, recv, group)[order]

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        send, recv, order, group = ctx.route
        back = torch.empty_like(g).index_copy_(0, order, g)
        return _exchange(back, recv, send, group), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, y: torch.Tensor, send: list[int], recv: list[int],
                order: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.route = send, recv, order, group
        back = torch.empty_like(y).index_copy_(0, order, y)
        return _exchange(back, recv, send, group)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple:
        send, recv, order, group = ctx.route
        return _exchange(g, send, recv, group)[order], None, None, None, None


class ExpertDispatch(torch.nn.Module):
    """Rows sorted by global expert (``counts`` rows for each of the ``experts``) sent to
    the ``group`` rank holding their expert (rank r holds experts r·L to (r+1)·L - 1),
    and received rows put in order of local expert. Returns what the experts run on:
    (rows, offsets of each local expert's rows, each row's local expert, the route),
    the route being what :class:`ExpertCombine` needs to send the results back."""

    def __init__(self, group: dist.ProcessGroup, experts: int) -> None:
        super().__init__()
        self.group, self.ranks = group, dist.get_world_size(group)
        self.local = experts // self.ranks

    def forward(self, x: torch.Tensor, sorted_experts: torch.Tensor, counts: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        per_rank = counts.view(self.ranks, self.local)
        got = torch.empty_like(per_rank)  # [source rank, local expert]
        dist.all_to_all_single(got, per_rank.contiguous(), group=self.group)
        send, recv = per_rank.sum(1).tolist(), got.sum(1).tolist()
        local = torch.arange(self.local, device=counts.device)
        experts = local.repeat(self.ranks).repeat_interleave(got.reshape(-1))
        order = torch.sort(experts, stable=True).indices
        rows = _Dispatch.apply(x, send, recv, order, self.group)
        offsets = got.sum(0).cumsum(0).to(torch.int32)
        return rows, offsets, experts[order], (send, recv, order)


class ExpertCombine(torch.nn.Module):
    """The experts' output rows back to the ranks their tokens came from, in the order
    they were sent (the inverse of :class:`ExpertDispatch`'s route)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, y: torch.Tensor, route: tuple) -> torch.Tensor:
        send, recv, order = route
        return _Combine.apply(y, send, recv, order, self.group)
