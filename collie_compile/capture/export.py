"""Capture a causal LM into a torch.fx graph with torch.export.

Non-strict export with dynamic batch and sequence dims, so one graph serves every
micro-batch size and sequence length the planner tries. On the meta device the capture
needs no memory; for planning we capture a probe of the model with a few decoder blocks
(all blocks are identical, see :mod:`collie_compile.capture.annotate`), which keeps capture time
independent of depth. Attention is captured as SDPA told the mask is causal, with
grouped K/V left grouped (:mod:`collie_compile.models.attention`), not transformers' export-time
materialised mask and per-group K/V copies.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import re
import traceback
from collections.abc import Callable, Iterator

import torch
from torch.export import Dim, ExportedProgram

from collie_compile.errors import CaptureError
from collie_compile.models.attention import causal_attention
from collie_compile.models.experts import grouped_experts, has_experts

_TORCH_DIR = os.path.dirname(torch.__file__)

# Example sizes for tracing: above 1 so export does not specialise the dims to 0/1.
EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 16


def capture(model: torch.nn.Module, batch: int = EXAMPLE_BATCH,
            seq: int = EXAMPLE_SEQ, max_seq: int | None = None) -> ExportedProgram:
    """Export ``model(input_ids=..., labels=...)`` (its training forward, returning the loss).

    Raises :class:`CaptureError` naming the module and source line where export failed.
    """
    return _with_fallbacks(model, lambda swap: _capture(model, batch, seq, max_seq, swap))


def _capture(model: torch.nn.Module, batch: int, seq: int, max_seq: int | None,
             swap: bool) -> ExportedProgram:
    device = next(iter(model.parameters())).device
    # Distinct tensors: export would treat one tensor passed twice as an alias.
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    labels = torch.zeros(batch, seq, dtype=torch.long, device=device)
    max_seq = max_seq or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    b = Dim("batch", min=1, max=1 << 20)
    s = Dim("seq", min=2, max=max(int(max_seq or 1 << 20), seq))
    kwargs = {"input_ids": ids, "labels": labels}
    dims = {"input_ids": {0: b, 1: s}, "labels": {0: b, 1: s}}
    try:
        with (causal_attention(model, swap), grouped_experts(model),
              _config_off(model, "use_cache", "output_router_logits")):
            return torch.export.export(model, (), kwargs, dynamic_shapes=dims, strict=False)
    except Exception as e:  # export raises many types; all mean "cannot capture"
        if "Constraints violated" not in str(e):
            raise CaptureError(_explain(model, e)) from e
        first = e
    # Some torch releases cannot prove guards such as min(64*seq, 192*seq) == 64*seq over
    # the named range; automatic dims accept what they cannot prove. Both dims must
    # still come out symbolic.
    auto = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "labels": {0: Dim.AUTO, 1: Dim.AUTO}}
    try:
        with (causal_attention(model, swap), grouped_experts(model),
              _config_off(model, "use_cache", "output_router_logits")):
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=auto, strict=False)
    except Exception:
        raise CaptureError(_explain(model, first)) from first
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder"
                       and n.name.endswith("input_ids"))
    if any(isinstance(d, int) for d in placeholder.meta["val"].shape):
        raise CaptureError(_explain(model, first)) from first
    return ep


def capture_static(model: torch.nn.Module, input_ids: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> ExportedProgram:
    """Export ``model(input_ids=...)`` -> logits at this one shape (the runtime's graph:
    pipeline stages exchange fixed-size tensors, so no symbolic sizes are wanted). With
    ``position_ids`` the graph takes them second: positions that restart within a row
    start another document, which attends only to itself (transformers' packed-sequence
    mask, as ``DataCollatorWithFlattening`` batches are read without a KV cache)."""
    kwargs = {"input_ids": input_ids}
    if position_ids is not None:
        refuse_without_positions(model)
        kwargs["position_ids"] = position_ids

    def export(swap: bool) -> ExportedProgram:
        try:
            with (causal_attention(model, swap, packed=position_ids is not None),
                  grouped_experts(model), _config_off(model, "use_cache")):
                return torch.export.export(model, (), kwargs, strict=False)
        except Exception as e:  # export raises many types; all mean "cannot capture"
            raise CaptureError(_explain(model, e)) from e

    return _with_fallbacks(model, export)


# Where a model does not capture with its attention as built, the family's own SDPA path
# and then its eager attention are tried (e.g. attention with value heads narrower than
# query/key heads, which our causal SDPA path does not take under export).
FALLBACKS = ("sdpa", "eager")


# Mixture-of-experts layers, by their class names in transformers (experts banks, routers,
# gates, sparse MoE blocks); no dense decoder family has such a module.
EXPERT_MODULES = re.compile(r"(Experts|Router|Gating|SparseMoeBlock|MoE|Moe)$")


def refuse_experts(model: torch.nn.Module) -> None:
    """Refuse a mixture-of-experts model whose experts do not run through transformers'
    experts interface (a loop over experts has data-dependent shapes: torch.export cannot
    capture it), and what the runtime does not compute yet: router jitter."""
    moe = next(((n, m) for n, m in model.named_modules()
                if EXPERT_MODULES.search(type(m).__name__)), None)
    if moe is None:
        return
    name, mod = moe
    what = f"{type(model).__name__} is a mixture-of-experts model ({name}: {type(mod).__name__})"
    if not has_experts(model):
        raise CaptureError(f"{what} whose experts do not run through transformers' experts "
                           "interface (@use_experts_implementation): its loop over experts "
                           "has data-dependent shapes, which torch.export cannot capture")
    router = next((n for n, m in model.named_modules()
                   if hasattr(m, "top_k") and m.top_k is None), None)
    if router is not None:  # DeepSeek-V2's default config: transformers' forward fails too
        raise CaptureError(f"{what}: its router ({router}) routes each token to top_k=None "
                           "experts; set num_experts_per_tok in its config")
    if any(float(getattr(m, "jitter_noise", 0.0) or 0.0) > 0 for m in model.modules()):
        raise CaptureError(f"{what} with router_jitter_noise > 0: the jitter would stay on "
                           "in evaluation; set router_jitter_noise=0 in its config")


def refuse_sparse_attention(model: torch.nn.Module) -> None:
    """Refuse DeepSeek-style sparse attention (an indexer scores the keys and each query
    attends to its top-k): its selection reads the attention mask, which the captured
    causal path does not hand it as transformers does, and the captured program then
    computes another attention than the model's own (probes of DeepSeek-V3.2, GLM-MoE-DSA,
    AXK2 and Dots3 disagreed with transformers by 0.08 in loss)."""
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("Indexer"):
            raise CaptureError(f"{type(model).__name__} uses sparse attention ({name}: "
                               f"{type(mod).__name__} picks the keys each query attends "
                               "to): collie-compile cannot yet capture it as transformers "
                               "runs it")


def refuse_bidirectional(model: torch.nn.Module) -> None:
    """Refuse a model whose attention is not causal: an encoder's causal-LM class (BERT's
    ``BertLMHeadModel``, RoBERTa's, ...) attends both ways unless its config sets
    ``is_decoder``, and a config marked ``is_encoder`` or ``causal=False`` always does.
    Trained as a causal LM, each position would see the tokens it is to predict."""
    cfg = getattr(model, "config", None)
    wants_decoder = "config.is_decoder" in inspect.getsource(type(model).__init__)
    if ((wants_decoder and getattr(cfg, "is_decoder", False) is False)
            or getattr(cfg, "is_encoder", False) or getattr(cfg, "causal", True) is False):
        hint = (f"set \"is_decoder\": true in its config for a causal {type(model).__name__}"
                if wants_decoder else "use a decoder-only model")
        raise CaptureError(f"{type(model).__name__} attends in both directions (its "
                           f"{getattr(cfg, 'model_type', '')} config is an encoder's): as a "
                           f"causal LM every position would see the tokens it predicts; "
                           f"{hint}")


def refuse_without_positions(model: torch.nn.Module) -> None:
    """Refuse ``position_ids`` for a family whose forward takes none (ALiBi's BLOOM, MPT):
    transformers would reject the keyword, and positions there come from the mask."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise CaptureError(f"{type(model).__name__} takes no position_ids (its positions "
                           "are not an input): train it on one sequence per row, without "
                           "position_ids")


def _with_fallbacks(model: torch.nn.Module, export: Callable[[bool], ExportedProgram]
                    ) -> ExportedProgram:
    """``export(swap)`` with the model's attention as it is (``swap``: SDPA may become
    ours), else with each of :data:`FALLBACKS`; the first error if none captures. The
    model gets its own attention implementation back. Refuses first what it cannot capture
    faithfully: experts it cannot run, sparse attention, bidirectional models."""
    refuse_experts(model)
    refuse_sparse_attention(model)
    refuse_bidirectional(model)
    config = getattr(model, "config", None)
    start = getattr(config, "_attn_implementation", None)
    first: CaptureError | None = None
    try:
        for impl in (start, *(f for f in FALLBACKS if f != start and start is not None)):
            if impl != start:
                try:
                    model.set_attn_implementation(impl)
                except Exception:  # the family does not offer it
                    continue
            try:
                return export(impl == start)
            except CaptureError as e:
                first = first or e
        raise first
    finally:
        if start is not None and config._attn_implementation != start:
            model.set_attn_implementation(start)


@contextlib.contextmanager
def _config_off(model: torch.nn.Module, *names: str) -> Iterator[None]:
    """The config's ``names`` set false while inside; the user's values come back after.
    ``use_cache``: capture the training forward (transformers' default ``use_cache=True``
    returns a ``DynamicCache``, which export cannot output). ``output_router_logits``: the
    planner's capture leaves the routers' loss out (work of [tokens, experts], priced as
    nothing; its histogram has no kernel for the integers it counts on the meta device)."""
    config = getattr(model, "config", None)
    old = {n: getattr(config, n) for n in names if getattr(config, n, None)}
    for n in old:
        setattr(config, n, False)
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(config, n, v)


def _explain(model: torch.nn.Module, err: BaseException) -> str:
    """Name the innermost module (path and class) and source line where export failed."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = ""
    chain, e = [], err
    while e is not None and e not in chain:  # export often re-raises: look at every cause
        chain.append(e)
        e = e.__cause__ or e.__context__
    frames = [f for e in reversed(chain) for f in traceback.walk_tb(e.__traceback__)]
    for frame, lineno in frames:
        code = frame.f_code
        module = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        if (isinstance(module, torch.nn.Module) and id(module) in names
                and not code.co_filename.startswith(_TORCH_DIR)):
            line = linecache.getline(code.co_filename, lineno).strip()
            where = (f"in module {names[id(module)]!r} ({type(module).__name__}) at "
                     f"{code.co_filename}:{lineno} `{line}`")
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    what = f"{type(err).__name__}: {first}"
    model_name = type(model).__name__
    return (f"torch.export cannot capture {model_name} {where or '(outside any module)'}: "
            f"{what}. Rewrite that code without data-dependent control flow or unsupported "
            "ops, or register a fake/meta kernel for the op")
