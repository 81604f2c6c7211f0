"""Per-GPU memory of a training step under a parallel layout.

Model states follow the ZeRO paper (Ψ trainable parameters per rank before data
parallelism, d = dp): stage 1 shards optimizer states and fp32 master weights over d,
stage 2 also gradients, stage 3 also the 16-bit weights. Activations are the bytes the
graph saves for backward (measured per block, :mod:`collie_compile.cost.profile`),
times the micro-batches in flight on a pipeline stage (1F1B: stage k of p holds
min(p - k, m); GPipe: all m).

A step's memory peaks at one of these moments, and we report the breakdown at the largest:
  F, a micro-batch's backward starts: weights + states + saved activations + the loss's
     transients (gradients of the logits) or, with recomputation, one block's
     recomputed activations. At the step's first backward every in-flight micro-batch's
     activations are alive and no gradients yet; at a later one the accumulated
     gradients too, beside as many activations (1F1B's steady phase) or one set fewer
     (GPipe, and 1F1B stages that hold every micro-batch).
  B, the optimizer step: weights + states + all gradients + the update's temporaries.
Between them, activations are freed as gradients appear, both linear in depth, so the
moments bound every point in the backward pass.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np

from collie_compile.cost.profile import ActivationBytes, ModelProfile
from collie_compile.errors import CollieError, named
from collie_compile.layout import (
    DEFAULT_LORA_TARGETS,
    EXPERT_IMBALANCE,
    RECOMPUTE,
    SCHEDULES,
    even_split,
    vocab_parallel,
)
from collie_compile.optim.specs import OptimizerSpec


@dataclass(frozen=True)
class Layout:
    """How one training step is split over GPUs (the parallel part of a plan)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch_size: int = 1
    seq_len: int = 2048
    recompute: str = "none"
    num_microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per GPU (interleaved 1F1B)
    ep: int = 1  # routed experts split over ep of the dp ranks (expert parallelism)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self) -> None:
        for k in ("dp", "tp", "pp", "micro_batch_size", "seq_len", "num_microbatches"):
            if getattr(self, k) < 1:
                raise CollieError(f"{named(k)} must be a positive integer, got "
                                  f"{getattr(self, k)}")
        if self.zero not in (0, 1, 2, 3):
            raise CollieError(f"{named('zero')} must be 0, 1, 2 or 3, got {self.zero}")
        if self.recompute not in RECOMPUTE:
            raise CollieError(f"unknown recompute {self.recompute!r}; use one of "
                              f"{', '.join(RECOMPUTE)}")
        if self.schedule not in SCHEDULES:
            raise CollieError(f"unknown schedule {self.schedule!r}; use one of "
                              f"{', '.join(SCHEDULES)}")
        if self.ep < 1 or self.dp % self.ep:
            raise CollieError(f"{named('ep')} must be a positive integer dividing dp={self.dp} "
                              f"(experts are split over data-parallel ranks), got {self.ep}")
        if self.virtual_stages < 1:
            raise CollieError(f"{named('virtual_stages')} must be a positive integer, got "
                              f"{self.virtual_stages}")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise CollieError(f"virtual_stages={self.virtual_stages} needs the interleaved "
                              f"schedule, not {self.schedule}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU at its peak moment."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    other_bytes: int
    moment: str = "backward"  # "backward" (start of backward) or "step" (optimizer step)
    stage: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activations_bytes + self.other_bytes)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k.endswith("_bytes")}
        d["total_bytes"] = self.total_bytes
        return d


@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage holds: decoder blocks and whether it has the ends."""

    blocks: int
    has_embed: bool
    has_head: bool


@dataclass(frozen=True)
class StageTerms:
    """One pipeline stage's memory as linear functions of its blocks per recompute mode.

    Every part is a (fixed, per block) pair; activations have one per-block value per
    recompute mode. Moment F (a micro-batch's backward starts) comes in two forms: the
    step's first backward, with every in-flight micro-batch's activations (``acts``) and
    no gradients yet; and a later one, with the accumulated gradients (``grads_f``) and
    ``acts_later`` of those activations (one set fewer once no forward runs between two
    backwards). Both add one transient: the loss's (``head_tmp``), a block's backward
    (``recompute_tmp[c]`` if any block uses mode c: what it recomputes and its input
    gradients, less the loss's activations, freed by then, beside the LM head's weight
    gradient where no gradient counted holds it: ``head_grad``), or a fused update
    (``fused_tmp``); plus ``gather_tmp`` (ZeRO-3). Moment B (end of backward and
    optimizer step, absent for fused optimizers without accumulation): weights, states
    and all gradients plus ``step_tmp``. ZeRO-3 under pipelining adds ``gathered`` weights
    to both later moments. Under ZeRO 0/1 the gradients live in persistent
    flat buffers, so they are there at the first backward too (``grads_kept``). Block
    counts may be ints or numpy arrays (the planner evaluates every mix at once); the
    ILP uses these numbers.
    """

    weights: tuple[float, float]
    gathered: tuple[float, float]  # weights ZeRO-3 keeps gathered to a pipelined step's end
    states: tuple[float, float]
    grads_kept: tuple[float, float]  # gradients alive from the step's start
    grads_f: tuple[float, float]  # gradients at a later micro-batch's backward
    grads_b: tuple[float, float]
    acts: tuple[float, dict[str, float]]  # in-flight activations at the first backward
    acts_later: float  # fraction of ``acts`` alive at a later backward
    act_kept: float  # alive through the step: masks, rotary tables, pipeline buffers
    head_tmp: float
    recompute_tmp: dict[str, float]
    # The LM head's weight gradient beside a block's backward, at the first and a later
    # moment, where the gradients counted there do not hold it.
    head_grad: tuple[float, float]
    fused_tmp: float
    gather_tmp: float
    step_tmp: float
    has_step_moment: bool

    def frugal_mode(self, modes: tuple[str, ...]) -> str:
        """The mode among ``modes`` whose blocks save the fewest activations."""
        return min(modes, key=lambda c: self.acts[1][c])

    def transient(self, counts: dict[str, int | np.ndarray], beside_block: float = 0.0
                  ) -> float | np.ndarray:
        """The largest transient; ``beside_block`` is held beside a block's backward."""
        out = max(self.head_tmp, self.fused_tmp)
        for c, k in counts.items():
            out = np.where(np.asarray(k) > 0,
                           np.maximum(out, self.recompute_tmp[c] + beside_block), out)
        return out

    def moments(self, counts: dict[str, int | np.ndarray]) -> dict[str, tuple]:
        """Each moment's (params, grads, optimizer, activations, other) bytes."""
        n = sum(counts.values())
        weights, states = _lin(self.weights, n), _lin(self.states, n)
        acts = self.acts[0] + sum(k * self.acts[1][c] for c, k in counts.items())
        later = self.act_kept + acts * self.acts_later
        first, again = (self.transient(counts, g) + self.gather_tmp for g in self.head_grad)
        held = weights + _lin(self.gathered, n)
        out = {"first": (weights, _lin(self.grads_kept, n), states, self.act_kept + acts,
                         first),
               "later": (held, _lin(self.grads_f, n), states, later, again)}
        if self.has_step_moment:
            out["step"] = (held, _lin(self.grads_b, n), states, self.act_kept, self.step_tmp)
        return out

    def peak(self, counts: dict[str, int | np.ndarray]) -> float | np.ndarray:
        """Peak bytes (the largest moment) holding ``counts[c]`` blocks of mode c."""
        return functools.reduce(np.maximum, (sum(m) for m in self.moments(counts).values()))

    def breakdown(self, counts: dict[str, int], stage: int = 0) -> MemoryBreakdown:
        """The peak of this stage holding ``counts[c]`` blocks recomputed with mode c."""
        name, parts = max(self.moments(counts).items(), key=lambda kv: sum(kv[1]))
        return MemoryBreakdown(*(int(x) for x in parts),
                               "step" if name == "step" else "backward", stage)


def _lin(part: tuple[float, float], n: int | np.ndarray) -> float | np.ndarray:
    return part[0] + n * part[1]


@dataclass(frozen=True)
class LoraCost:
    """What LoRA adapters add: their parameters (whole model) and, per block and sample,
    the activations they save (each distinct adapter input x, and A·x)."""

    params: int
    saved: ActivationBytes


def lora_cost(profile: ModelProfile, rank: int, targets: str | list[str] | tuple[str, ...]
              | None = None, dora: bool = False) -> LoraCost:
    """Adapters of rank ``rank`` on every linear matching ``targets`` (matched as peft
    matches ``target_modules``: a list by name suffix, a string as a regex; default
    q_proj and v_proj): r·(in + out) parameters each. An empty list: no adapter on any
    linear, the whole base frozen (prompt methods: their few parameters are not
    counted). ``dora``: DoRA keeps two more [seq, out] tensors per adapter for backward
    (the base's output and the low-rank branch's, which the magnitude scales)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if targets is not None and not isinstance(targets, str) and not list(targets):
        return LoraCost(0, ActivationBytes(0, 0))
    if rank < 1:
        raise CollieError(f"{named('lora_rank')} must be a positive integer, got {rank}")
    targets = DEFAULT_LORA_TARGETS if targets is None else targets
    config = LoraConfig(r=rank, target_modules=targets if isinstance(targets, str)
                        else list(targets))
    seq, item = profile.seq_len, profile.itemsize
    per_block, inputs, low_rank, narrowest = 0, {}, 0, None
    for n in profile.block_graph:
        if n["kind"] == "linear" and check_target_module_exists(config, n["module"]):
            out = n["out_bytes"] // (seq * item)  # per sample: [seq, out]
            inp = n["flops"] // (2 * seq * out)
            per_block += rank * (inp + out)
            inputs[tuple(n["inputs"])] = seq * inp * item  # q and v share theirs
            low_rank += seq * (rank + (2 * out if dora else 0)) * item
            narrowest = min(narrowest or inp, inp, out)
    if not per_block:
        names = sorted({n["module"].rpartition(".")[2] for n in profile.block_graph
                        if n["kind"] == "linear"})
        raise CollieError(f"no linear of {profile.name} matches LoRA targets {targets!r}; "
                          f"its blocks' linears are {', '.join(names)} (--lora-targets)")
    if rank > narrowest:  # past min(in, out) an adapter is no longer low-rank
        raise CollieError(f"{named('lora_rank')}={rank} is more than the narrowest targeted "
                          f"linear's {narrowest} features: the adapters would outgrow the weights; "
                          f"use a rank of at most {narrowest} (8-64 is usual)")
    return LoraCost(per_block * profile.num_layers,
                    ActivationBytes(sum(inputs.values()) + low_rank, 0))



def backward_grads(profile: ModelProfile) -> ActivationBytes:
    """Per sample, the most gradient bytes a block's backward holds beside its saved
    activations: those one op produces for its inputs, and the residual stream's."""
    nodes = {n["name"]: n for n in profile.block_graph}
    hidden = profile.seq_len * profile.hidden_size * profile.itemsize
    best = ActivationBytes(0, 0)
    for n in profile.block_graph:
        sources = [nodes[i] for i in n["inputs"] if i in nodes]
        shard = sum(x["out_bytes"] for x in sources if x["sharded"])
        rep = hidden * (1 + n["reads_input"]) + sum(
            x["out_bytes"] for x in sources if not x["sharded"])
        if rep + shard > best.replicated + best.sharded:
            best = ActivationBytes(rep, shard)
    return best


@dataclass
class MemoryModel:
    """Evaluates a layout for one model profile, optimizer and dtype."""

    profile: ModelProfile
    optimizer: OptimizerSpec
    trainable_fraction: float = 1.0  # < 1 with LoRA: frozen weights keep no grads or states
    lora: LoraCost | None = None  # LoRA: frozen blocks save less, adapters a little
    # Grouped-query attention runs with K/V expanded (no fused kernel for groups in this
    # dtype on the device: GPUSpec.fused_gqa); blocks that keep attention's inputs save more.
    expanded_kv: bool = False
    # the busiest expert-parallel rank's rows over the mean: it holds that many experts'
    # activations (layout.EXPERT_IMBALANCE)
    expert_imbalance: float = EXPERT_IMBALANCE

    @functools.cached_property
    def block_backward(self) -> ActivationBytes:
        """Per sample, the input gradients a block's backward holds (``backward_grads``)."""
        return backward_grads(self.profile)

    def activations(self, recompute: str) -> ActivationBytes:
        """Saved bytes per block and sample under ``recompute``."""
        p = self.profile
        act = p.activations(recompute)
        if recompute == "full":  # the block's input only
            return act
        # selective recomputes the expansion; it keeps attention's output only
        extra = p.act_expanded_kv if self.expanded_kv else ActivationBytes(0, 0)
        if recompute == "none":
            act = act + extra
        if self.lora is None:
            return act
        frozen = p.act_frozen + extra + self.lora.saved
        return min(act, frozen, key=lambda a: a.replicated + a.sharded)

    def stages(self, layout: Layout) -> list[StageShape]:
        """An even split of the blocks (the planner chooses uneven ones itself)."""
        counts = even_split(self.profile.num_layers, layout.pp)
        return [StageShape(n, i == 0, i == len(counts) - 1) for i, n in enumerate(counts)]

    def block_params_per_rank(self, tp: int) -> float:
        p = self.profile
        return p.block_params_sharded / tp + (p.block_params - p.block_params_sharded)

    def expert_params_per_rank(self, ep: int) -> float:
        """A block's routed experts on one rank when ep splits them (0 when it does not:
        then they are ordinary weights, in block_params_per_rank)."""
        return self.profile.block_expert_params / ep if ep > 1 else 0.0

    def end_params_per_rank(self, tp: int, has_embed: bool, has_head: bool) -> float:
        p = self.profile
        vt = vocab_shards(p, tp)
        n = 0.0
        if has_embed:
            n += p.embed_params / vt
        if has_head:
            n += p.head_params / vt
            if not has_embed:  # tied LM head needs its own copy on the last stage
                n += p.tied_params / vt
        return n

    def estimate(self, layout: Layout) -> MemoryBreakdown:
        """The fullest GPU's breakdown under ``layout``."""
        layout.validate()
        return max((self.estimate_stage(layout, k) for k in range(layout.pp)),
                   key=lambda m: m.total_bytes)

    def estimate_stage(self, layout: Layout, k: int) -> MemoryBreakdown:
        stage = self.stages(layout)[k]
        terms = self.stage_terms(layout, k, stage.has_embed, stage.has_head)
        return terms.breakdown({layout.recompute: stage.blocks}, k)

    def stage_terms(self, layout: Layout, k: int, has_embed: bool, has_head: bool
                    ) -> StageTerms:
        """Linear memory terms of pipeline stage ``k`` under ``layout`` (any recompute)."""
        p, opt = self.profile, self.optimizer
        tp, d, b = layout.tp, layout.dp, layout.micro_batch_size
        vt = vocab_shards(p, tp)
        w = p.itemsize
        # fp32 master copies for 16-bit weights; LOMO and AdaLomo update 16-bit weights directly.
        master = 0 if p.dtype == "fp32" or not opt.keeps_master else 4
        # Experts split by ep are outside ZeRO (data_parallel leaves them to the ep group):
        # the terms below are the other weights', the experts' are added at the end.
        experts = self.expert_params_per_rank(layout.ep)
        psi = (self.end_params_per_rank(tp, has_embed, has_head),
               self.block_params_per_rank(tp) - (p.block_expert_params if experts else 0))
        trainable = tuple(x * self.trainable_fraction for x in psi)
        largest = p.largest_param / tp

        weights = tuple(x * w / (d if layout.zero == 3 else 1) for x in psi)
        if layout.zero == 2 and d > 1:  # FSDP2 keeps each shard beside the gathered copy
            weights = tuple(x * w * (1 + 1 / d) for x in psi)
        state_per_elem = opt.state_bytes + master
        if opt.factored:
            state_per_elem += p.factored_state_elems / p.num_params * 4
        states = tuple(x * state_per_elem / (d if layout.zero >= 1 else 1) for x in trainable)
        accumulate = layout.num_microbatches > 1
        grads_b = tuple(x * w / (d if layout.zero >= 2 else 1) for x in trainable)
        # torch.distributed.pipelining turns FSDP2's gradient sync off until a stage's last
        # backward is done and keeps the weights it gathered for backward until then: under
        # pp, ZeRO-2/3 stages hold whole gradients (and ZeRO-3 whole weights) at the end
        # of their backwards. Without pp, FSDP2 reduce-scatters every micro-batch.
        pipelined_fsdp = layout.pp > 1 and layout.zero >= 2 and d > 1
        gathered = (0.0, 0.0)
        if pipelined_fsdp:
            grads_b = tuple(x * w for x in trainable)
            if layout.zero == 3:
                gathered = tuple(x * w * (1 - 1 / d) for x in psi)
        fused = opt.fused_backward and not accumulate
        # ZeRO 0/1 keep gradients in persistent flat buffers, all-reduced in place
        # (passes.data_parallel.GradReducer); fused rules free each gradient once applied.
        in_buffers = d > 1 and layout.zero <= 1 and not opt.fused_backward
        grads_kept = grads_b if in_buffers else (0.0, 0.0)
        grads_f = grads_b if accumulate or in_buffers else (0.0, 0.0)

        # Activations of the micro-batches in flight on this stage.
        if layout.schedule == "gpipe":
            in_flight = layout.num_microbatches
        else:
            in_flight = min(layout.pp - k, layout.num_microbatches)
            if layout.schedule == "interleaved" and layout.pp > 1:
                in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.virtual_stages)
        # torch.distributed.pipelining keeps each in-flight micro-batch's stage output
        # (hidden states; the logits on the last stage) until its backward, and makes one
        # receive buffer per micro-batch and model chunk for inputs (on all but the first
        # chunk; the in-flight ones are the first block's saved input) and for gradients.
        # Counted per model chunk (v per rank when interleaved; the first chunk gets no
        # inputs, the last sends no gradients and outputs the logits).
        v = layout.virtual_stages if layout.schedule == "interleaved" else 1
        hidden = p.seq_len * p.hidden_size * w * b
        held_out, buffers = 0.0, 0.0
        if layout.pp > 1:
            held_out = (v - has_head) * hidden + has_head * p.logits_bytes * w / 4 / vt * b
            receiving = v - (k == 0)
            recv_in = (layout.num_microbatches - in_flight) * receiving
            recv_grad = layout.num_microbatches * (v - (k == layout.pp - 1))
            buffers = (max(recv_in, 0) + recv_grad) * hidden
        act_fixed = in_flight * (held_out + b * (
            (p.act_embed if has_embed else 0) + (p.act_head / vt if has_head else 0)))
        act_block = {c: in_flight * b * self.activations(c).per_rank(tp) for c in RECOMPUTE}
        # under ep the busiest rank's experts save imbalance x the mean rows' activations;
        # recomputed (full), they come back in its backward
        uneven = (self.expert_imbalance - 1) * p.act_experts * b if experts else 0.0
        for c in ("none", "selective"):
            act_block[c] += in_flight * uneven
        # A later backward (gradients accumulated) follows a forward in 1F1B's steady
        # phase; when every micro-batch is in flight (GPipe, or m <= pp - k) it follows a
        # backward, which freed one micro-batch's activations.
        acts_later = 1.0
        if accumulate and in_flight >= layout.num_microbatches:
            acts_later = (in_flight - 1 / v) / in_flight  # a backward frees one chunk's

        # Transients in backward: gradients of the logits (two [b, s, V] fp32 buffers in
        # cross-entropy's backward), or later, once the loss's own activations are
        # freed, a block's: what it recomputes and the gradients of one op's inputs.
        head_tmp = 2 * b * p.logits_bytes / vt if has_head else 0.0
        none = self.activations("none").per_rank(tp)
        block_tmp = b * self.block_backward.per_rank(tp) - (
            b * p.act_head / vt if has_head else 0.0)
        recompute_tmp = {c: max(0.0, block_tmp + b * (none - self.activations(c).per_rank(tp)))
                         + (uneven if c == "full" else 0.0) for c in RECOMPUTE}
        gather_tmp = 0.0
        if layout.zero == 3 and d > 1:
            # one block gathered (all it holds but experts split by ep), the next
            # prefetched, and in backward its whole gradient until the reduce-scatter; and
            # the stage's own unit (embeddings, final norm, LM head), gathered through its
            # forward and at the start of its backward
            gather_tmp = (2 * psi[1] + trainable[1] + psi[0] * (1 - 1 / d)) * w
        # the update's temporaries, and an fp32 copy of a 16-bit gradient for its master
        step_tmp = (opt.step_temporaries + (master > 0)) * largest * 4
        # The LM head's weight gradient is made before any block's backward and kept whole
        # until the step (FSDP2's root unit reduce-scatters it last); flat buffers and the
        # accumulated gradients of a later backward hold it already, fused rules free it.
        head_grad = (0.0, 0.0)
        if has_head and not fused and not in_buffers:
            whole = self.end_params_per_rank(tp, False, True) * self.trainable_fraction * w
            fsdp_flat = layout.zero >= 2 and d > 1 and layout.pp == 1
            head_grad = (whole, whole if fsdp_flat or not accumulate else 0.0)
        # The one gradient in flight and its update come after the loss's transients.
        fused_tmp = largest * w + step_tmp if fused else 0.0
        if experts:
            x = experts * self.trainable_fraction
            weights = (weights[0], weights[1] + experts * w)
            states = (states[0], states[1] + x * state_per_elem)
            grads_b = (grads_b[0], grads_b[1] + x * w)
            # summed over the ranks holding the same experts by a GradReducer (its flat
            # buffers from the step's start) when there are such ranks
            reduced = d > layout.ep and not opt.fused_backward
            grads_kept = (grads_kept[0], grads_kept[1] + x * w * reduced)
            grads_f = (grads_f[0], grads_f[1] + x * w * (accumulate or reduced))
        return StageTerms(
            weights=weights, gathered=gathered, states=states, grads_kept=grads_kept,
            grads_f=grads_f, grads_b=grads_b,
            acts=(act_fixed, act_block), acts_later=acts_later, act_kept=p.act_fixed + buffers,
            head_tmp=head_tmp, recompute_tmp=recompute_tmp, head_grad=head_grad,
            fused_tmp=fused_tmp,
            gather_tmp=gather_tmp, step_tmp=step_tmp,
            has_step_moment=not fused or pipelined_fsdp)


def vocab_shards(profile: ModelProfile, tp: int) -> int:
    """Ways the embedding, LM head and logits split under tensor parallelism."""
    return tp if vocab_parallel(profile.vocab_size, bool(profile.tied_params), tp) else 1


def estimate_json(model: str, num_params: int, trainable: int, gpu_name: str, gpu_memory: int,
                  usable_memory: float, layout: Layout, optimizer: str, dtype: str,
                  mem: MemoryBreakdown, update_in_backward: bool = False,
                  active_params: int | None = None) -> str:
    """The ``estimate --json`` document (its keys are a contract other tools read)."""
    doc = {
        "model": model, "num_params": num_params, "trainable_params": trainable,
        "active_params": num_params if active_params is None else active_params,
        "gpu": gpu_name, "gpu_memory_bytes": gpu_memory,
        "usable_memory_bytes": int(usable_memory),
        "layout": {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                   "zero": layout.zero,
                   "micro_batch_size": layout.micro_batch_size,
                   "num_microbatches": layout.num_microbatches, "schedule": layout.schedule,
                   "virtual_stages": layout.virtual_stages, "seq_len": layout.seq_len,
                   "recompute": layout.recompute},
        "optimizer": optimizer, "update_in_backward": update_in_backward, "dtype": dtype,
        "per_gpu": mem.to_dict(),
        "fits": mem.total_bytes <= usable_memory,
    }
    return json.dumps(doc, indent=2)
