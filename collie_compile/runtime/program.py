"""The rank program: a plan applied to a model for one rank, pass after pass.

Every rank captures the model at the plan's micro-batch shape and applies the passes for
its coordinates in the (pp, dp, tp) mesh, in this order:

    capture -> router_outputs -> tensor_parallel -> expert_parallel -> lora | ia3 ->
    outline_blocks -> pipeline_split, then per stage move_to_device -> grouped_experts ->
    expand_grouped_kv -> (weights read) -> recompute -> dropout -> data_parallel

:func:`build_rank_program` is that list, one pass per line; what the passes found (the
shards, the groups that sum partial gradients, which stage holds which weight) comes
back as a typed :class:`RankProgram`, which also knows which boxes of each weight this
rank reads and writes in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import fx

from collie_compile.capture.annotate import annotate
from collie_compile.capture.export import capture_static
from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError
from collie_compile.layout import vocab_parallel
from collie_compile.models.attention import fused_gqa
from collie_compile.models.probe import attention_heads
from collie_compile.models.prompts import (
    PrefixedModel,
    PromptedModel,
    is_prefix,
    is_prompt_method,
    make_encoder,
    refuse_prefix_past_positions,
    refuse_prompt_with,
    train_prompts_only,
    virtual_tokens,
)
from collie_compile.models.registry import tied_names
from collie_compile.passes.data_parallel import data_parallel
from collie_compile.passes.dropout import dropout_follows_mode
from collie_compile.passes.expand_kv import expand_grouped_kv
from collie_compile.passes.expert_parallel import ep_record, expert_parallel
from collie_compile.passes.grouped_experts import fused_grouped_experts
from collie_compile.passes.ia3 import ia3 as ia3_pass
from collie_compile.passes.lora import (
    Adapter,
    is_adapter,
    lora_record,
    pending_magnitudes,
    start_magnitudes,
)
from collie_compile.passes.lora import lora as lora_pass
from collie_compile.passes.move_to_device import move_to_device
from collie_compile.passes.outline_blocks import outline_blocks
from collie_compile.passes.pipeline_split import pipeline_split
from collie_compile.passes.recompute import recompute as recompute_pass
from collie_compile.passes.router_outputs import router_outputs
from collie_compile.passes.tensor_parallel import Shard, tensor_parallel, tp_record
from collie_compile.planner.result import Plan
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime import state as ckpt
from collie_compile.runtime.options import refuse_what_peft_cannot_adapt
from collie_compile.runtime.router_loss import RouterLoss, router_loss

T = TypeVar("T")


@dataclass
class Coordinates:
    """Where this rank sits in the (pp, dp, tp) mesh, and in its expert-parallel group
    (carved from dp: dp rank d is rank d % ep of the ep group of dp ranks d // ep · ep to
    d // ep · ep + ep - 1)."""

    pp: int
    dp: int
    tp: int
    ep: int = 0


@dataclass
class RankProgram:
    """What one rank runs and holds."""

    plan: Plan
    config: object  # the model's transformers config
    mesh: object  # DeviceMesh (pp, dp, tp)
    coords: Coordinates
    device: torch.device
    stages: list[fx.GraphModule]  # this rank's pipeline stages, in order
    stage_ids: list[int]  # their indices among all pp x virtual stages
    block_prefix: str
    tp_shards: dict[str, Shard]  # parameter -> how tp split it
    vocab_slice: tuple[int, int] | None  # this rank's logits columns (vocab-parallel head)
    partial_groups: dict[str, object]  # parameter -> tp group summing its partial gradient
    param_shapes: dict[str, tuple[int, ...]]  # every parameter's full shape, on every rank
    param_dtypes: dict[str, torch.dtype]
    owner: dict[str, int]  # parameter -> the pp rank holding it
    stage_inputs: list[list[tuple[tuple[int, ...], torch.dtype]]]  # per stage, its inputs
    tied: dict[str, str]  # alias -> the name checkpoints store
    tied_stages: dict[str, list[int]]  # a tied weight copied on several pp ranks -> them
    tied_groups: dict[str, object]  # ... and the group summing its copies' gradients
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # persistent, on CPU
    fan_in_fan_out: set[str] = field(default_factory=set)  # Conv1D modules ([in, out])
    takes_positions: bool = False  # the first stage takes position_ids after input_ids
    ep_shards: dict[str, Shard] = field(default_factory=dict)  # expert weight -> its split
    ep_group: object = None  # the ranks splitting the experts (None: ep = 1)
    router_loss: RouterLoss | None = None  # the last stage returns router logits for it
    adapters: dict[str, Adapter] = field(default_factory=dict)  # LoRA prefix -> its base
    # prompt methods: positions before each sequence; the logits are of the real ones,
    # shifted by one (models.prompts), so the labels are the targets, unshifted
    virtual_tokens: int = 0

    def shard(self, name: str) -> tuple[Shard, int] | None:
        """How ``name`` is split between ranks (by tp, or by ep for routed experts) and
        this rank's index among them; None for a weight held whole."""
        if name in self.ep_shards:
            return self.ep_shards[name], self.coords.ep
        shard = self.tp_shards.get(name)
        return None if shard is None else (shard, self.coords.tp)

    @property
    def chosen(self) -> object:
        return self.plan.chosen

    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF name -> this rank's parameter (a tp slice; a DTensor under ZeRO 2/3)."""
        return {n: p for st in self.stages for n, p in st.named_parameters()}

    def is_last(self) -> bool:
        """Whether this rank runs the last pipeline stage (where the loss is)."""
        return self.chosen.pp * self.chosen.virtual_stages - 1 in self.stage_ids

    # -- which boxes of a weight this rank holds, reads and writes ------------------------

    def boxes(self, name: str, p: torch.Tensor) -> list[tuple[ckpt.Box, tuple]]:
        """The checkpoint boxes of this rank's ``p``, each with its index in the local
        tensor."""
        shard, rank = self.shard(name) or (None, 0)
        return ckpt.local_boxes(p, shard, rank, self.param_shapes[name])

    def cut(self, name: str, p: torch.Tensor, v: torch.Tensor, dim: int | None = None
            ) -> list[tuple[torch.Tensor, ckpt.Box]]:
        """``v`` (``p`` or a state of it; with ``dim``, a 1-D statistic along that dim of
        the weight) cut into ``p``'s boxes, each box once."""
        out, seen = [], set()
        for box, idx in self.boxes(name, p):
            if dim is not None:
                box, idx = dim_box(box, dim), (idx[dim],)
            if box not in seen:
                seen.add(box)
                out.append((local_tensor(v)[idx], box))
        return out

    def read(self, name: str, p: torch.Tensor, stored: list, what: str,
             dim: int | None = None) -> torch.Tensor:
        """This rank's part of ``p`` (with ``dim``, of a 1-D statistic along that dim)
        from a checkpoint's pieces."""
        boxes, shape = self.boxes(name, p), tuple(local_tensor(p).shape)
        if dim is not None:
            boxes, shape = [(dim_box(b, dim), (i[dim],)) for b, i in boxes], (shape[dim],)
        return ckpt.read_local(stored, boxes, shape, what)

    def stored_name(self, name: str, stored: dict) -> str | None:
        """``name``, or the name a tied weight is stored under in ``stored``."""
        if name in stored:
            return name
        canonical = self.tied.get(name)
        return next((k for k in stored if canonical is not None
                     and self.tied.get(k) == canonical), None)

    def load_weights(self, stage: fx.GraphModule, pieces: dict, source: object) -> None:
        """Replace each of ``stage``'s parameters by this rank's slice of it in ``pieces``
        (a Hugging Face checkpoint's tensors, read from ``source``); LoRA adapters a base
        model's checkpoint does not hold keep their init (or the adapter given)."""
        for name, p in list(stage.named_parameters()):
            key = self.stored_name(name, pieces)
            if key is None and is_adapter(name):
                continue
            if key is None:
                raise CollieError(f"{source} has no weight {name!r}; is it a checkpoint of "
                                  f"{self.plan.model}?")
            owner, _, leaf = name.rpartition(".")
            value = self.read(name, p, pieces[key], key).to(p.dtype)
            setattr(stage.get_submodule(owner), leaf,
                    torch.nn.Parameter(value, requires_grad=p.requires_grad))

    def tp_first(self, name: str) -> bool:
        """False on a tp rank that holds the same slice as a lower one (GQA KV heads)."""
        shard = self.tp_shards.get(name)
        r = self.coords.tp
        return shard.first(r) if shard is not None else r == 0

    def writes(self, name: str, p: torch.Tensor) -> bool:
        """Whether this rank saves ``name`` (and counts it in the gradient norm): one copy
        of every box. Experts split by ep: the first ep group's copy."""
        stages = self.tied_stages.get(name)
        replica = self.coords.dp // self.chosen.ep if name in self.ep_shards else self.coords.dp
        return (self.tp_first(name) and (hasattr(p, "to_local") or replica == 0)
                and (stages is None or self.coords.pp == stages[0]))

    def gather_tp(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a slice of ``name``: tp's, or ep's of routed experts) whole, from every
        rank's slice."""
        split = self.shard(name)
        if split is None:
            return t
        shard = split[0]
        group = self.ep_group if name in self.ep_shards else self.mesh.get_group("tp")
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return shard.assemble(parts)


def dim_box(box: ckpt.Box, dim: int) -> ckpt.Box:
    """The 1-D box of a statistic along ``dim`` of a weight in ``box``."""
    return ckpt.Box((box.offset[dim],), (box.shape[dim],), (box.global_shape[dim],))


def named_pass(name: str, fn: Callable[[], T]) -> T:
    """Run one pass with its name on any error: a refusal keeps its message, led by the
    pass's name; a bug becomes a RuntimeError saying which pass it is in."""
    try:
        return fn()
    except CollieError as e:
        if str(e).startswith(name):
            raise
        raise type(e)(f"{name}: {e}", shared=e.shared) from None
    except Exception as e:
        raise RuntimeError(f"pass {name} failed: {type(e).__name__}: {e}") from e


def apply_pass(name: str, fn: Callable[[], T]) -> T:
    """:func:`named_pass` on every rank at once (:func:`cdist.agree`): an error on one rank
    is raised on all, so none goes on to the next collective alone."""
    return cdist.agree(lambda: named_pass(name, fn))


def build_rank_program(model: torch.nn.Module, plan: Plan, weights: str | Path | None = None,
                       lora: object | None = None, lora_init: dict | None = None,
                       updates_in_backward: bool = False, position_ids: bool = False
                       ) -> RankProgram:
    """This rank's program for ``plan``: the model captured and rewritten by the passes
    for its coordinates. With ``weights`` (a safetensors checkpoint) each rank reads only
    the slices it holds, so the model may come on the meta device. ``lora`` (a
    ``peft.LoraConfig`` or ``IA3Config``, defaults filled in) adds adapters, initialised
    from ``lora_init`` where given.
    ``updates_in_backward``: the optimizer updates inside backward (ZeRO-1 by owners).
    ``position_ids``: the program takes them too (documents packed into rows)."""
    c, cfg = plan.chosen, model.config
    mesh = cdist.build_mesh(c.pp, c.dp, c.tp)
    coords = Coordinates(*(mesh.get_local_rank(d) for d in ("pp", "dp", "tp")))
    device = cdist.device()
    tied = tied_names(model)
    model.train()
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and weights is None:
        raise CollieError("the model is on the meta device; pass weights=DIR (a Hugging "
                          "Face safetensors checkpoint) to load its weights")
    if on_meta:
        cdist.agree(lambda: materialize_buffers(model))
    ids = torch.zeros(c.micro_batch_size, plan.seq_len, dtype=torch.long,
                      device="meta" if on_meta else "cpu")
    # distinct tensors: export would treat one tensor passed twice as an alias
    pos = torch.zeros_like(ids) if position_ids else None

    aux = router_loss(model)  # refused before any capture where it cannot be computed
    v, prompted = virtual_tokens(lora), is_prompt_method(lora)
    target = model
    if prompted:
        refuse_prompt_with(aux, position_ids)
        if is_prefix(lora):
            refuse_prefix_past_positions(lora, cfg, plan.seq_len)
        encoder = make_encoder(lora, model, lora_init)
        prompts = {k: t.detach().clone() for k, t in encoder.state_dict().items()}
        encoder = encoder.to("meta") if on_meta else encoder
        target = (PrefixedModel(model, encoder, lora) if is_prefix(lora)
                  else PromptedModel(model, encoder, v))
    ep = apply_pass("capture", lambda: capture_static(target, ids, pos))
    ag = annotate(ep, target)
    gm = router_outputs(drop_guards(ag.gm))
    if on_meta:
        empty_constants_off_meta(gm)
    if prompted:
        gm = train_prompts_only(gm, prompts)
    layout = named_pass("tensor_parallel", lambda: tp_layout(ag, cfg, c.tp, bool(tied)))
    gm = apply_pass("tensor_parallel", lambda: tensor_parallel(
        gm, layout, mesh.get_group("tp"), coords.tp, c.tp, *head_layout(cfg)))
    ep_group, edp_group = expert_groups(mesh, c.dp, c.ep)
    coords.ep = coords.dp % c.ep
    gm = apply_pass("expert_parallel", lambda: expert_parallel(gm, ep_group, coords.ep, c.ep))
    if prompted:
        pass  # the prompt module was captured with the model
    elif lora is not None and lora.peft_type.value == "IA3":
        refuse_what_peft_cannot_adapt(model, lora)
        gm = apply_pass("ia3", lambda: ia3_pass(gm, lora, c.tp, lora_init, coords.tp))
    elif lora is not None:
        refuse_what_peft_cannot_adapt(model, lora)
        tp_group = mesh.get_group("tp") if c.tp > 1 else None
        gm = apply_pass("lora", lambda: lora_pass(gm, lora, c.tp, lora_init,
                                                  tp_rank=coords.tp, ep_rank=coords.ep,
                                                  tp_group=tp_group))
    record = tp_record(gm)
    magnitudes = dict(pending_magnitudes(gm))  # DoRA's, started once weights are read
    gm = apply_pass("outline_blocks", lambda: outline_blocks(gm, ag.block_prefix))
    parts = apply_pass("pipeline_split", lambda: pipeline_split(gm, ag.block_prefix,
                                                                c.chunks()))
    mine = [k for k in range(len(parts)) if k % c.pp == coords.pp]

    every = list(ag.gm.named_parameters(remove_duplicate=False))
    owner = {n: k % c.pp for k, part in enumerate(parts) for n, _ in part.named_parameters()}
    tied_stages = _tied_stages(parts, c.pp, tied, owner)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    from transformers.pytorch_utils import Conv1D

    program = RankProgram(
        plan=plan, config=cfg, mesh=mesh, coords=coords, device=device, stages=[],
        stage_ids=mine, block_prefix=ag.block_prefix, tp_shards=dict(record.shards),
        vocab_slice=record.vocab_slice,
        partial_groups=_partial_groups(mesh, record.partial_grads),
        param_shapes={n: _full_shape(record.shards.get(n) or ep_record(gm).get(n), p.shape)
                      for n, p in every},
        ep_shards=dict(ep_record(gm)), ep_group=ep_group,
        param_dtypes={n: p.dtype for n, p in every}, owner=owner,
        stage_inputs=[[(tuple(n.meta["val"].shape), n.meta["val"].dtype)
                       for n in part.graph.nodes if n.op == "placeholder"] for part in parts],
        tied=tied, tied_stages=tied_stages, tied_groups=_tied_groups(mesh, tied_stages),
        # Persistent buffers a checkpoint holds beside the weights (an activation's eps,
        # a frozen table): training leaves them alone, saving writes them back.
        buffers={n: b.detach().to("cpu", copy=True) for n, b in model.state_dict().items()
                 if n not in params and not b.is_meta},
        # weights stored [in, out] (GPT-2's Conv1D): a merged adapter goes in transposed
        fan_in_fan_out={n for n, m in model.named_modules() if isinstance(m, Conv1D)},
        takes_positions=position_ids, router_loss=aux, adapters=dict(lora_record(gm)),
        virtual_tokens=v)

    pieces = cdist.agree(lambda: ckpt.hf_pieces(Path(weights))) if weights else None
    dtype = next(iter(ag.gm.parameters())).dtype
    dp_mesh = mesh["dp"] if c.dp > 1 else None
    # ZeRO-1 inside backward: gradients all-reduced in flat buckets as ZeRO-0 does, each
    # weight then updated by the dp rank owning its states (runtime.updates).
    zero = 0 if c.zero == 1 and updates_in_backward else c.zero
    for k in mine:
        # per-stage passes: local to this rank, no collective (ranks may differ, e.g. in
        # whether their GPU fuses grouped-query attention)
        st = named_pass("move_to_device", lambda k=k: move_to_device(parts[k], device))
        st = named_pass("grouped_experts", lambda st=st: fused_grouped_experts(st))
        if not fused_gqa(device, dtype):
            st = named_pass("expand_grouped_kv", lambda st=st: expand_grouped_kv(st))
        if pieces is not None:  # read just this rank's slices
            cdist.agree(lambda st=st: program.load_weights(st, pieces, weights))
            cdist.agree(lambda st=st: start_magnitudes(st, magnitudes))
        st = named_pass("recompute", lambda st=st: recompute_pass(
            st.to(device), ag.block_prefix, c.layer_modes()))
        st = named_pass("dropout", lambda st=st: dropout_follows_mode(st))
        st = named_pass("data_parallel", lambda st=st: data_parallel(
            st, dp_mesh, zero, ag.block_prefix, experts=frozenset(program.ep_shards),
            expert_group=edp_group))
        program.stages.append(st)
    return program


def release_weights(model: torch.nn.Module, program: RankProgram) -> None:
    """Replace by meta-device parameters the user's weights this rank's program does not
    hold (other pipeline stages', whole tensors that tp or ZeRO-3 sliced), so that a rank
    never keeps two copies (their memory goes once nothing else refers to them; a
    checkpoint's memory-mapped file too); the model's other weights are the program's own
    tensors. Using the model afterwards fails loudly on meta tensors instead of reading
    weights that training no longer updates."""
    held = {local_tensor(p).untyped_storage().data_ptr()
            for p in program.local_parameters().values()}
    meta: dict[int, torch.nn.Parameter] = {}  # one replacement per weight: ties stay tied
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta or p.untyped_storage().data_ptr() in held:
                continue
            if id(p) not in meta:
                meta[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                 requires_grad=p.requires_grad)
            setattr(module, name, meta[id(p)])


def _full_shape(shard: Shard | None, local: torch.Size) -> tuple[int, ...]:
    shape = list(local)
    if shard is not None:
        shape[shard.dim] = shard.size
    return tuple(shape)


def expert_groups(mesh: object, dp: int, ep: int) -> tuple[object, object]:
    """This rank's expert-parallel group (``ep`` consecutive dp ranks, the same pp and tp
    coordinates) and its expert-data-parallel group (the dp ranks holding the same
    experts: one from each ep group); None where a group would be this rank alone."""
    if ep == 1:
        return None, None
    if dp % ep:
        raise CollieError(f"ep={ep} must divide dp={dp}: the expert-parallel group is "
                          "carved from the data-parallel ranks")
    ep_sets = [[j * ep + i for i in range(ep)] for j in range(dp // ep)]
    edp_sets = [[j * ep + i for j in range(dp // ep)] for i in range(ep)]
    ep_groups = cdist.subgroups(mesh, ep_sets, "dp")
    edp_groups = cdist.subgroups(mesh, edp_sets, "dp") if dp > ep else {}
    return next(iter(ep_groups.values())), next(iter(edp_groups.values()), None)


def _partial_groups(mesh: object, partial: dict[str, list[list[int]]]) -> dict[str, object]:
    """For each parameter whose gradient tp peers hold in parts, the group of this rank's
    peers that sum it."""
    sets = sorted({tuple(s) for v in partial.values() for s in v})
    groups = cdist.subgroups(mesh, [list(s) for s in sets]) if sets else {}
    return {k: next(groups[tuple(s)] for s in v if tuple(s) in groups)
            for k, v in partial.items()}


def _tied_stages(parts: list[fx.GraphModule], pp: int, tied: dict[str, str],
                 owner: dict[str, int]) -> dict[str, list[int]]:
    """A tied weight (input and output embedding) used on several pipeline stages is a
    copy on each: their gradients are summed over those stages (Megatron's embedding
    group), and the copy on the lowest stage counts as the weight."""
    holders: dict[str, set[int]] = {}
    for k, part in enumerate(parts):
        for n, _ in part.named_parameters():
            holders.setdefault(tied.get(n, n), set()).add(k % pp)
    return {n: sorted(holders[tied.get(n, n)]) for n in owner
            if len(holders[tied.get(n, n)]) > 1}


def _tied_groups(mesh: object, tied_stages: dict[str, list[int]]) -> dict[str, object]:
    sets = sorted({tuple(v) for v in tied_stages.values()})
    groups = cdist.subgroups(mesh, [list(v) for v in sets], "pp") if sets else {}
    return {n: groups[tuple(v)] for n, v in tied_stages.items() if tuple(v) in groups}


def drop_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the input-shape guards of a static capture: the rank program runs at the
    captured shape only."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    return gm


def tp_layout(ag: object, cfg: object, tp: int, tied: bool) -> dict[str, str]:
    """How each linear of the blocks splits under tp ("column" in the sharded region,
    else "row"), and the embedding and LM head ("vocab") where the vocabulary splits. A
    mixture of experts' sublayer (router, experts, shared experts) stays replicated: every
    tp rank runs it whole on the same tokens (ep splits the experts)."""
    layout = {i.name: "column" if i.sharded else "row" for i in ag.nodes.values()
              if i.kind == "linear" and i.block is not None and not i.replicated}
    vocab = int(cfg.vocab_size)
    if vocab_parallel(vocab, tied, tp):
        # Vocabulary-parallel embedding and head: the logits stay split over tp.
        for i in ag.nodes.values():
            if i.block is None and (i.kind == "linear" or i.op == "aten.embedding.default") \
                    and any(ag.param_shapes[p][0] == vocab for p in i.params):
                layout[i.name] = "vocab"
    return layout


def head_layout(cfg: object) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of a transformers config (whatever
    the family calls them; multi-query models have one key/value head)."""
    heads, kv = attention_heads(cfg)
    return heads, kv, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def empty_constants_off_meta(gm: fx.GraphModule) -> None:
    """Put on the CPU the empty tensors a capture on the meta device made constants of
    (a KV cache's initial keys, ``torch.tensor([])``), which hold no value to read."""
    for name, t in list(vars(gm).items()):
        if isinstance(t, torch.Tensor) and t.is_meta and t.numel() == 0:
            setattr(gm, name, torch.empty(t.shape, dtype=t.dtype))


def materialize_buffers(model: torch.nn.Module) -> None:
    """Give a meta-device model real buffers (rotary tables): checkpoints do not hold
    them, so rebuild each owning module from the config on the CPU."""
    for path, mod in model.named_modules():
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=model.config)
        except Exception as e:  # any constructor failure means we cannot rebuild it
            raise CollieError(f"cannot rebuild the buffers of {path} ({type(mod).__name__}) "
                              f"off the meta device: {e}; load the model on the CPU") from None
        for name, buf in fresh.named_buffers(recurse=False):
            mod.register_buffer(name, buf, persistent=name in mod.state_dict())
