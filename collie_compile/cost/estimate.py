"""``collie_compile.estimate()``: the memory of one fixed layout, with its checks."""

from __future__ import annotations

from dataclasses import dataclass, replace

from collie_compile import disk_cache
from collie_compile.config import LoraRequest, Request
from collie_compile.cost.hardware import GPUSpec, get_gpu
from collie_compile.cost.memory import Layout, MemoryBreakdown, MemoryModel, lora_cost
from collie_compile.cost.profile import ModelProfile, profile_model
from collie_compile.errors import CollieError, named
from collie_compile.layout import INTERLEAVED_CHUNKS
from collie_compile.models.presets import config_identity
from collie_compile.optim.specs import get_optimizer


@dataclass(frozen=True)
class Estimate:
    model: str
    num_params: int
    trainable_params: int
    gpu: GPUSpec
    layout: Layout
    optimizer: str
    dtype: str
    memory: MemoryBreakdown
    memory_reserve: float = 0.05  # kept free, as the planner keeps it
    update_in_backward: bool = False  # the optimizer updates inside backward
    active_params: int | None = None  # a token's share: k of E routed experts (None: dense)

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * (1 - self.memory_reserve)

    @property
    def fits(self) -> bool:
        return self.memory.total_bytes <= self.usable_bytes


def resolve_sizes(gpus: int | None, dp: int | None, tp: int, pp: int) -> tuple[int, int, int]:
    """(dp, tp, pp) from what the user gave; raises if they do not multiply to ``gpus``."""
    for name, v in (("gpus", gpus), ("dp", dp), ("tp", tp), ("pp", pp)):
        if v is not None and v < 1:
            raise CollieError(f"{named(name)} must be a positive integer, got {v}")
    if dp is None:
        gpus = gpus or tp * pp
        if gpus % (tp * pp):
            raise CollieError(f"gpus={gpus} is not divisible by tp*pp={tp * pp}; choose tp and "
                              f"pp whose product divides {gpus}")
        dp = gpus // (tp * pp)
    elif gpus is not None and dp * tp * pp != gpus:
        raise CollieError(f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} but gpus={gpus}; "
                          "make the product equal the GPU count")
    return dp, tp, pp


def default_seq_len(model: str | object) -> int:
    """2048, or the model's context length if shorter (kept on disk with the profiles)."""
    identity = config_identity(model)  # None for a config object: read it directly
    path = disk_cache.entry("context", [str(model), identity]) if identity else None
    known = disk_cache.read(path) if path else None
    if not isinstance(known, dict) or "max_pos" not in known:
        from collie_compile.models.registry import load_config

        cfg = load_config(model)
        known = {"max_pos": getattr(cfg, "max_position_embeddings", None)
                 or getattr(cfg, "n_positions", None)}
        if path:
            disk_cache.write(path, known)
    return min(2048, int(known["max_pos"] or 2048))


def check_tp(profile: ModelProfile, tp: int) -> None:
    """Heads must split evenly; KV heads split or are replicated (GQA)."""
    check_heads(profile.name, profile.num_heads, profile.num_kv_heads, tp)


def check_heads(name: str, heads: int, kv: int, tp: int) -> None:
    if heads % tp:
        raise CollieError(f"tp={tp} does not divide {name}'s {heads} attention heads; "
                          f"use a tp that divides {heads}")
    if kv % tp and tp % kv:
        raise CollieError(f"tp={tp} neither divides nor is a multiple of {name}'s {kv} "
                          "key/value heads")


def estimate(model: str, gpus: int | None = None, gpu: str | GPUSpec = "a100-80gb",
             dp: int | None = None, tp: int = 1, pp: int = 1, zero: int = 0,
             micro_batch_size: int = 1, num_microbatches: int | None = None,
             seq_len: int | None = None, recompute: str = "none", optimizer: str = "adamw",
             dtype: str = "bf16", schedule: str = "1f1b", lora_rank: int | None = None,
             lora_targets: str | list[str] | None = None, memory_reserve: float = 0.05,
             virtual_stages: int | None = None, tp_refusal: str | None = None,
             update_in_backward: bool | None = None, ep: int = 1) -> Estimate:
    """Per-GPU memory of training ``model`` under one layout (no GPU needed). With
    ``lora_rank`` only adapters on ``lora_targets`` (default q_proj, v_proj) train. It
    fits if it leaves ``memory_reserve`` of the GPU free, as :func:`plan` requires. The
    interleaved schedule holds ``virtual_stages`` model chunks per GPU (default 2, as the
    planner prices it). ``tp_refusal`` says why tp > 1 cannot run this model
    (:func:`collie_compile.runtime.refusals.tp_refusal`). ``update_in_backward``: Lion,
    AdamW, Adam or Adan update inside backward (LOMO and AdaLomo always do). ``ep``
    splits a mixture of experts' routed experts over that many of the dp ranks."""
    Request(gpus=gpus, seq_len=seq_len, dtype=dtype, memory_reserve=memory_reserve)
    LoraRequest(rank=lora_rank, targets=lora_targets)
    spec = get_gpu(gpu)
    opt = get_optimizer(optimizer)
    if update_in_backward and not opt.fused_backward:
        opt = opt.in_backward()  # raises for rules that cannot
    elif update_in_backward is False and opt.fused_backward:
        raise CollieError(f"{opt.name} updates inside backward by design; "
                          "--no-update-in-backward applies to lion, adamw, adam, adan")
    seq_len = seq_len if seq_len is not None else default_seq_len(model)
    dp, tp, pp = resolve_sizes(gpus, dp, tp, pp)
    layout = Layout(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch_size=micro_batch_size,
                    seq_len=seq_len, recompute=recompute, schedule=schedule,
                    num_microbatches=pp if num_microbatches is None else num_microbatches,
                    virtual_stages=virtual_stages or (
                        INTERLEAVED_CHUNKS if schedule == "interleaved" and pp > 1 else 1),
                    ep=ep)
    layout.validate()
    prof = replace(profile_model(model, seq_len=seq_len, dtype=dtype), tp_refusal=tp_refusal)
    check_tp(prof, tp)
    problem = layout_problem(layout, prof, gpus_per_node=tp,
                             global_batch=dp * micro_batch_size * layout.num_microbatches,
                             in_backward=opt.fused_backward)
    if problem:
        raise CollieError(problem[1])
    lora = None if lora_rank is None else lora_cost(prof, lora_rank, lora_targets)
    trainable = prof.num_params if lora is None else lora.params
    mem = MemoryModel(prof, opt, trainable / prof.num_params, lora,
                      expanded_kv=not spec.fused_gqa(dtype)).estimate(layout)
    return Estimate(prof.name, prof.num_params, trainable, spec, layout, opt.name, dtype, mem,
                    memory_reserve, opt.fused_backward, prof.active_params)


def layout_problem(lay: Layout, prof: ModelProfile, gpus_per_node: int,
                   global_batch: int, in_backward: bool = False) -> tuple[str, str] | None:
    """Why a layout cannot run, as (rule, message), or None if it can: the runtime's
    rules, checked up front (by the planner for every layout it tries). ``in_backward``:
    the optimizer updates inside backward."""
    m, heads = lay.num_microbatches, _heads_problem(prof, lay.tp)
    share = lay.dp * lay.micro_batch_size  # sequences one micro-batch step takes
    rules = [
        ("zero", lay.zero and lay.dp == 1,
         f"zero={lay.zero} shards over data-parallel ranks, and dp=1 has none"),
        ("schedule", lay.schedule != "1f1b" and lay.pp == 1,
         f"the {lay.schedule} schedule needs pp > 1"),
        ("node", lay.tp > gpus_per_node, f"tp={lay.tp} would span nodes of {gpus_per_node} "
                                         "GPUs"),
        ("heads", heads, heads),
        ("tp-support", lay.tp > 1 and prof.tp_refusal, prof.tp_refusal),
        ("layers", lay.pp * lay.virtual_stages > prof.num_layers,
         f"pp={lay.pp}" + (f" x {lay.virtual_stages} chunks" if lay.virtual_stages > 1
                           else "") + f" needs {lay.pp * lay.virtual_stages} layers, "
                                      f"{prof.name} has {prof.num_layers}"),
        ("batch", global_batch % share,
         f"dp x micro-batch ({lay.dp} x {lay.micro_batch_size}) does not divide the global "
         f"batch {global_batch} (--global-batch {-(-global_batch // share) * share} would)"),
        # torch's pipeline schedules need m >= pp; interleaved ones run rounds of pp
        ("fill", 1 < lay.pp > m, f"pp={lay.pp} needs at least {lay.pp} micro-batches, "
                                 f"the batch gives {m}"),
        ("rounds", lay.schedule == "interleaved" and m % lay.pp,
         f"the interleaved schedule needs micro-batches ({m}) a multiple of pp={lay.pp}"),
        ("ep-experts", lay.ep > 1 and not prof.num_experts,
         f"ep={lay.ep} splits routed experts, and {prof.name} has none; use ep=1"),
        ("ep-divide", lay.ep > 1 and prof.num_experts % lay.ep,
         f"ep={lay.ep} does not divide {prof.name}'s {prof.num_experts} experts"),
        ("ep-dp", lay.dp % lay.ep, f"ep={lay.ep} must divide dp={lay.dp} (the ep group is "
                                    "carved from the data-parallel ranks)"),
        ("ep-zero1", lay.ep > 1 and lay.zero == 1 and lay.dp > 1,
         f"ZeRO-1 shards optimizer states over all dp ranks, and under ep={lay.ep} they hold "
         "different experts; use zero 0, 2 or 3 (experts stay split by ep)"),
        ("tied", in_backward and lay.pp > 1 and prof.tied_params,
         f"pp={lay.pp} puts {prof.name}'s tied embedding and LM head on different stages, "
         "whose gradients must be summed before an update inside backward; use pp=1 or "
         "update after backward (--no-update-in-backward)"),
    ]
    return next(((rule, msg) for rule, broken, msg in rules if broken), None)


def _heads_problem(prof: ModelProfile, tp: int) -> str | None:
    try:
        check_tp(prof, tp)
    except CollieError as e:
        return str(e).split(";")[0]
    return None
