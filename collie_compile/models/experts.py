"""How routed experts run: one grouped matrix product per projection, static shapes.

transformers 5.x keeps a mixture-of-experts layer's experts as fused 3-D weights and runs
them through an implementation chosen by name (``config._experts_implementation``). Its
``grouped_mm`` counts tokens per expert with ``histc`` on integers off the CPU, which has
no meta kernel, so it cannot be captured on the meta device where plans are made. The
``collie_experts`` implementation, registered through transformers' own ExpertsInterface,
computes the same thing with shapes that never depend on the routing:

    order   = stable sort of the (token, k) pairs by expert       [tokens·k]
    counts  = tokens per expert (a scatter-add: deterministic)     [experts]
    h       = grouped(x[order // k], W_up, cumsum(counts))         [tokens·k, 2·inter]
    y       = grouped(gate(h), W_down, cumsum(counts)) · weight     [tokens·k, hidden]
    out     = sum over k of y put back in (token, k) order          [tokens, hidden]

The router (softmax or sigmoid, top-k, groups, bias-corrected choice, normalisation) and
shared experts stay the family's own code, captured as it is. ``grouped`` is torch's
``grouped_mm`` where it has a kernel (CUDA, bf16, sm80+), else transformers'
registered per-expert fallback op; the graph prices either as the active experts'
FLOPs (:mod:`collie_compile.capture.annotate`). The choice is made while tracing, and
rank programs are traced on the CPU or the meta device, so their graphs record the
fallback; :mod:`collie_compile.passes.grouped_experts` points each such call at
:func:`grouped_mm`, which takes the fused kernel on the device where it can.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

IMPLEMENTATION = "collie_experts"


def _grouped_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's fused grouped GEMM takes ``x`` @ ``w`` (bf16 on sm80+, rows of
    16-byte multiples); the fallback is a per-expert loop."""
    return (hasattr(F, "grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``w[e]`` ([experts, in, out]):
    torch's fused grouped GEMM where it takes the operands, else transformers' per-expert
    loop (the op the graph then shows, and prices)."""
    if _grouped_kernel(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    return torch.ops.transformers.grouped_mm_fallback(x, w, offsets)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   transposed: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times expert ``e``'s weight (stored
    [experts, in, out] when ``transposed``, else [experts, out, in]), plus its bias rows."""
    w = weight if transposed else weight.transpose(-2, -1)
    out = grouped_mm(x.to(w.dtype), w, offsets)
    return out if bias is None else out + bias


@torch.library.custom_op("collie::expert_dispatch", mutates_args=())
def expert_dispatch(x: torch.Tensor, sorted_experts: torch.Tensor, counts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, offsets of each expert's rows, each row's expert, route) for ``x``, rows
    sorted by expert, ``counts`` of each: in one process, what came in (the route is
    unused). A marker the expert_parallel pass replaces by the all-to-all; an op of its
    own so that capture keeps it whole. Copies: an op's outputs may not alias its inputs."""
    return x.clone(), counts.cumsum(0).to(torch.int32), sorted_experts.clone(), counts.clone()


@expert_dispatch.register_fake
def _(x: torch.Tensor, sorted_experts: torch.Tensor, counts: torch.Tensor) -> tuple:
    return (torch.empty_like(x), torch.empty(counts.shape, dtype=torch.int32,
                                             device=counts.device),
            torch.empty_like(sorted_experts), torch.empty_like(counts))


@torch.library.custom_op("collie::expert_combine", mutates_args=())
def expert_combine(y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """The experts' output rows back where :func:`expert_dispatch` took them from: in one
    process, the rows themselves (a copy)."""
    return y.clone()


@expert_combine.register_fake
def _(y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(y)


def _rows_grad(ctx: object, g: torch.Tensor, *rest: object) -> tuple:
    return g, None, None


expert_dispatch.register_autograd(_rows_grad)
expert_combine.register_autograd(lambda ctx, g: (g, None))


def experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of ``module`` (a transformers experts class) on ``hidden_states``
    [tokens, hidden], each token sent to its ``top_k_index`` experts and their outputs
    summed with ``top_k_weights``."""
    k, hidden = top_k_index.shape[-1], hidden_states.shape[-1]
    experts = top_k_index.reshape(-1)
    order = torch.sort(experts, stable=True).indices
    sorted_experts = experts[order]
    counts = torch.zeros(module.num_experts, dtype=torch.int64, device=experts.device)
    counts = counts.scatter_add(0, experts, torch.ones_like(experts))
    # the rows each expert runs on; under expert parallelism, those of this rank's experts
    # from every rank of its group (the expert_parallel pass swaps the op)
    x, offsets, local, route = torch.ops.collie.expert_dispatch(
        hidden_states[order // k], sorted_experts, counts)
    gated = module.has_gate
    up = module.gate_up_proj if gated else module.up_proj
    up_bias = ((module.gate_up_proj_bias if gated else module.up_proj_bias)[local]
               if module.has_bias else None)
    h = grouped_linear(x, up, offsets, module.is_transposed, up_bias)
    h = module._apply_gate(h) if gated else module.act_fn(h)
    down_bias = module.down_proj_bias[local] if module.has_bias else None
    y = grouped_linear(h, module.down_proj, offsets, module.is_transposed, down_bias)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    y = torch.ops.collie.expert_combine(y, route)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    # back into (token, k) order; summing over k in fp32 as transformers' grouped_mm does
    unsorted = torch.empty_like(y).index_copy(0, order, y)
    return unsorted.view(-1, k, hidden).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


def has_experts(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs routed experts through transformers' experts interface."""
    return any(hasattr(m, "_apply_gate") and hasattr(m, "num_experts")
               for m in model.modules())


@contextlib.contextmanager
def grouped_experts(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s experts with ``collie_experts`` while inside (the user's choice of
    implementation comes back after)."""
    config = getattr(model, "config", None)
    if config is None or not has_experts(model):
        yield
        return
    start = getattr(config, "_experts_implementation", None)
    model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(start)
