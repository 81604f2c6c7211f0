"""What the runtime cannot do exactly for a model, found before planning: refuse, never
corrupt. Each check runs the runtime's own code on a small probe of the model; verdicts
are cached beside the profiles, so the planner CLI answers a known model without torch.
"""

from __future__ import annotations

import functools
import json
import os

from collie_compile import disk_cache
from collie_compile.errors import CollieError
from collie_compile.models.presets import config_identity

# The code whose behaviour a tp verdict depends on (a change re-judges every model).
_TP_CODE = ("collie_compile.passes.tensor_parallel", "collie_compile.capture.annotate",
            "collie_compile.capture.export", "collie_compile.models.attention",
            "collie_compile.models.probe", "collie_compile.models.experts",
            "collie_compile.layout",
            "collie_compile.runtime.program", "collie_compile.runtime.refusals")


def tp_refusal(model: str | object) -> str | None:
    """Why tensor parallelism cannot run ``model`` (a MODEL argument or a transformers
    config) exactly (fused projections cut in ways tp cannot follow, ...), found by
    running the tensor_parallel pass for tp=2 on a two-block probe on the meta device;
    None if it can."""
    if isinstance(model, (str, os.PathLike)):
        identity = config_identity(model)
        parts = ["model", str(model), identity] if identity else None
    else:
        parts = ["config", model.to_json_string()]
    path = (disk_cache.entry("tp-refusal", [*parts, *disk_cache.code_of(*_TP_CODE)])
            if parts else None)
    known = disk_cache.read(path) if path else None
    if isinstance(known, dict) and "refusal" in known:
        return known["refusal"]
    from collie_compile.models.registry import load_config

    refusal = _judge_tp(load_config(model))
    if path:
        disk_cache.write(path, {"refusal": refusal})
    return refusal


def _judge_tp(cfg: object) -> str | None:
    import torch

    from collie_compile.capture.annotate import annotate
    from collie_compile.capture.export import capture_static
    from collie_compile.errors import CollieError
    from collie_compile.models.registry import build_model, model_name, tied_names, with_layers
    from collie_compile.passes.tensor_parallel import tensor_parallel
    from collie_compile.runtime.program import drop_guards, head_layout, tp_layout

    model = build_model(with_layers(cfg, min(2, int(cfg.num_hidden_layers))))
    ag = annotate(capture_static(model, torch.zeros(2, 16, dtype=torch.long,
                                                     device="meta")), model)
    gm = drop_guards(ag.gm)
    try:
        tensor_parallel(gm, tp_layout(ag, cfg, 2, bool(tied_names(model))), None, 0, 2,
                        *head_layout(cfg))
    except CollieError as e:
        reason = str(e).removeprefix("tensor_parallel: ").split("; use tp=1")[0]
        return f"tp>1 unsupported for {model_name(cfg)}: {reason}; dp, pp and ZeRO work"
    return None


def loss_refusal(cfg: object) -> str | None:
    """Why the runtime's loss would not be this model's own (CPM-Ant's does not shift the
    labels), a mixture of experts' router loss included: both computed on a one-block CPU
    probe with random weights; None where they agree (or the probe cannot run: capture
    then says why)."""
    from collie_compile.models.registry import model_name

    return _loss_refusal(cfg.to_json_string(), model_name(cfg))


@functools.lru_cache(maxsize=16)
def _loss_refusal(cfg_json: str, name: str) -> str | None:
    import torch

    from collie_compile.models.probe import probe_config
    from collie_compile.models.registry import build_model, config_from_dict
    from collie_compile.runtime.router_loss import router_loss
    from collie_compile.runtime.step import IGNORE_INDEX, token_loss

    try:
        probe = probe_config(config_from_dict(json.loads(cfg_json), name), layers=1,
                             no_dropout=True)
        torch.manual_seed(0)
        model = build_model(probe, device="cpu").eval()
        ids = torch.randint(0, int(probe.vocab_size), (2, 16),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - a probe that does not run says nothing of the loss
        return None
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    ours = float(token_loss(out.logits, targets)) / int((targets != IGNORE_INDEX).sum())
    try:
        aux = router_loss(model)  # the routers' loss, where the config asks for it
    except CollieError as e:
        return str(e)
    if aux is not None:
        ours += float(aux(out.router_logits, torch.ones_like(ids)))
    theirs = float(out.loss)
    if abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)):
        return None
    return (f"{name}: its own loss is not next-token cross-entropy on its logits "
            f"({theirs:.4f} against {ours:.4f} on a probe), which is what collie-compile "
            "trains (as transformers' ForCausalLMLoss: labels shifted by one, -100 "
            "ignored); train it with its own training code")
