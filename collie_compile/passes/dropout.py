"""Dropout that follows the program's mode, as it follows the model's.

``torch.export`` in training mode records dropout as ``aten.dropout(x, p, True)`` and
attention dropout as SDPA's constant ``dropout_p``: the captured graph drops in every
pass, so ``forward`` and ``eval_loss`` would be random where the Hugging Face model in
``eval()`` is not. This pass rewrites each ``aten.dropout`` into a call of a
``torch.nn.Dropout(p)`` submodule, and each SDPA ``dropout_p > 0`` into the output of a
:class:`DropoutRate` submodule (``p`` in training mode, 0 in eval mode), so that
``train()``/``eval()`` on the program switch them as they switch the model's. Training
draws the same masks as before. Walks ``gm`` and the graph modules nested in it; assumes
nothing else about the graph, so it can run last.
"""

from __future__ import annotations

import torch
from torch import fx

from collie_compile.models.attention import expanded_sdpa

_DROPOUT = torch.ops.aten.dropout.default
# SDPA, and the same call with K/V expanded (:mod:`.expand_kv`)
_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default, expanded_sdpa)
_SDPA_P = 4  # dropout_p's position in SDPA's arguments


class DropoutRate(torch.nn.Module):
    """SDPA's ``dropout_p``: ``p`` while training, 0 in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self) -> float:
        return self.p if self.training else 0.0


def dropout_follows_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """Route dropout through submodules that respect ``train()``/``eval()``."""
    for mod in list(gm.modules()):
        if not isinstance(mod, fx.GraphModule):
            continue
        count = 0
        for n in list(mod.graph.nodes):
            if n.op != "call_function":
                continue
            name = f"mode_dropout_{count}"
            if n.target is _DROPOUT and _training(n):
                mod.add_submodule(name, torch.nn.Dropout(float(n.args[1])))
                with mod.graph.inserting_before(n):
                    new = mod.graph.call_module(name, (n.args[0],))
                new.meta = dict(n.meta)
                n.replace_all_uses_with(new)
                mod.graph.erase_node(n)
                count += 1
            elif n.target in _ATTENTION and _rate(n):
                mod.add_submodule(name, DropoutRate(_rate(n)))
                with mod.graph.inserting_before(n):
                    rate = mod.graph.call_module(name, ())
                rate.meta["val"] = _rate(n)
                if len(n.args) > _SDPA_P:
                    n.args = (*n.args[:_SDPA_P], rate, *n.args[_SDPA_P + 1:])
                else:
                    n.kwargs = {**n.kwargs, "dropout_p": rate}
                count += 1
        if count:
            mod.graph.lint()
            mod.recompile()
    return gm


def _training(n: fx.Node) -> bool:
    return bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True))


def _rate(n: fx.Node) -> float:
    p = n.args[_SDPA_P] if len(n.args) > _SDPA_P else n.kwargs.get("dropout_p", 0.0)
    return float(p) if isinstance(p, (int, float)) else 0.0
