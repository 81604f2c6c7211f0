"""A training plan: plain data that round-trips to JSON and rebuilds the same program.

``Plan`` holds the request (model, GPUs, batch, optimizer, dtype), the chosen layout
(:class:`Candidate`) with its modeled memory and time, and the runners-up with why each
lost. ``Plan.to_json`` / ``Plan.from_json`` are exact inverses; ``Plan.summary`` is the
``collie-compile plan --json`` document, whose keys other tools read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from collie_compile.cost.hardware import CATALOG
from collie_compile.errors import CollieError
from collie_compile.layout import RECOMPUTE, SCHEDULES, canonical_lora_targets

SUMMARY_KEYS = ("dp", "tp", "pp", "ep", "zero", "micro_batch_size", "num_microbatches", "schedule",
                "virtual_stages", "recompute", "stages", "memory_per_gpu_bytes", "step_time_s",
                "tokens_per_gpu_per_s", "mfu", "update_in_backward")


@dataclass
class Candidate:
    """One fully specified layout and what the cost model says of it."""

    dp: int
    tp: int
    pp: int
    zero: int
    micro_batch_size: int
    num_microbatches: int
    schedule: str
    virtual_stages: int
    # Stage k's blocks and their recomputation, as priced: with v = 1, stage k holds layers
    # stages[k] and layer i recomputes as recompute[i]; interleaved, pp rank k holds that
    # many blocks, with those modes, spread over its v chunks (see chunks, layer_modes)
    recompute: list[str]  # one entry per decoder layer
    stages: list[list[int]]  # [first_layer, last_layer] per pipeline stage
    memory_per_gpu_bytes: int  # the fullest GPU at its peak
    step_time_s: float
    tokens_per_gpu_per_s: float
    mfu: float
    memory: list[dict] = field(default_factory=list)  # per-stage breakdown
    sharding: dict[str, str] = field(default_factory=dict)  # linear module -> strategy
    fits: bool = True
    why_not: str = ""
    update_in_backward: bool = False  # the optimizer updates each weight inside backward
    ep: int = 1  # routed experts split over ep of the dp ranks (expert parallelism)

    def summary(self, with_why: bool = False) -> dict:
        d = {k: getattr(self, k) for k in SUMMARY_KEYS}
        # what each pp rank runs: interleaved, ``stages`` are the priced block counts, and
        # a rank's layers are v chunks spread over the model
        d["layers_per_rank"] = self.layers_per_rank()
        if with_why:
            d["why_not"] = self.why_not
        return d

    def chunks(self) -> list[list[int]]:
        """[first, last] layer of each pipeline chunk in model order; chunk k runs on pp
        rank k % pp. Interleaved, rank k's planned block count is split into v chunks as
        evenly as possible, so that each rank holds what its stage was priced for."""
        v = self.virtual_stages
        if v == 1:
            return [list(s) for s in self.stages]
        counts = [b - a + 1 for a, b in self.stages]
        out, first = [], 0
        for j in range(v):
            for n in counts:
                size = n // v + (j < n % v)
                out.append([first, first + size - 1])
                first += size
        return out

    def layers_per_rank(self) -> list[list[list[int]]]:
        """[first, last] of each chunk pp rank r holds, for every rank."""
        chunks = self.chunks()
        return [chunks[r::self.pp] for r in range(self.pp)]

    def layer_modes(self) -> list[str]:
        """Recomputation of each model layer as the runtime applies it: rank k's layers,
        in order, take the modes priced for stage k."""
        chunks = self.chunks()
        modes = [""] * len(self.recompute)
        for k, (a, b) in enumerate(self.stages):
            layers = [i for c in chunks[k::self.pp] for i in range(c[0], c[1] + 1)]
            for i, mode in zip(layers, self.recompute[a:b + 1]):
                modes[i] = mode
        return modes

    def layout_str(self) -> str:
        sched = self.schedule + (f"(v={self.virtual_stages})" if self.virtual_stages > 1
                                 else "")
        counts = {m: self.recompute.count(m) for m in ("none", "selective", "full")}
        rc = ", ".join(f"{n} {m}" for m, n in counts.items() if n)
        where = " update in backward" if self.update_in_backward else ""
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return (f"dp={self.dp} tp={self.tp} pp={self.pp}{ep} zero={self.zero} "
                f"micro-batch={self.micro_batch_size}x{self.num_microbatches} {sched} "
                f"recompute: {rc}{where}")


@dataclass
class Plan:
    model: str
    gpus: int
    gpu: str
    gpus_per_node: int
    seq_len: int
    global_batch_size: int
    optimizer: str
    dtype: str
    lora_rank: int | None
    feasible: bool
    solver: str
    solve_time_s: float
    chosen: Candidate | None
    alternatives: list[Candidate] = field(default_factory=list)
    usable_memory_bytes: int = 0  # per GPU: capacity less the reserve
    shortfall_bytes: int = 0  # when infeasible: how far the closest plan is over memory
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lora_targets: str | list[str] | None = None  # peft target_modules; None: q_proj, v_proj
    max_grad_norm: float | None = None  # global-norm clipping priced (two-pass: 2 passes)
    clip_mode: str = "two-pass"
    # what binds the plan to a model, beside its name (a path names different models in
    # different folders); 0: a plan file written before it was recorded
    num_params: int = 0
    # what the adapters add, priced: a prompt method's positions before each sequence,
    # DoRA's activations
    virtual_tokens: int = 0
    lora_dora: bool = False

    @property
    def update_in_backward(self) -> bool:
        """Whether the chosen plan updates each weight inside backward."""
        return bool(self.chosen and self.chosen.update_in_backward)

    def summary(self) -> dict:
        """The ``plan --json`` document."""
        return {
            "feasible": self.feasible, "solve_time_s": self.solve_time_s, "model": self.model,
            "gpus": self.gpus, "gpu": self.gpu,
            "plan": self.chosen.summary() if self.chosen else None,
            "alternatives": [a.summary(with_why=True) for a in self.alternatives],
            "usable_memory_bytes": self.usable_memory_bytes,
            # what the closest plan is over, and what would fit (empty when it fits)
            "shortfall_bytes": self.shortfall_bytes, "suggestions": list(self.suggestions),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps({"collie_compile_plan": FORMAT, **asdict(self),
                           "priced": _fingerprint(asdict(self))}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CollieError(f"{source} is not valid JSON ({e}); re-create it with "
                              "`collie-compile plan ... --out`") from None
        if not isinstance(data, dict) or "collie_compile_plan" not in data:
            raise CollieError(f"{source} is not a collie-compile plan file")
        if data.pop("collie_compile_plan") != FORMAT:
            raise CollieError(f"{source} is a plan of another format than this collie-compile "
                              f"reads ({FORMAT}); re-create it with `collie-compile plan ... "
                              "--out`")
        priced = data.pop("priced", None)
        # the digest of what the file holds: fields added since it was written take
        # their defaults and do not void it
        as_written = _fingerprint(data)
        try:
            if data.get("chosen") is not None:
                data["chosen"] = _candidate(data["chosen"])
            data["alternatives"] = [_candidate(a) for a in data.get("alternatives", [])]
            _check_keys(cls, data)
            plan = cls(**data)
            plan._check_sizes()
        except (TypeError, KeyError, ValueError) as e:
            raise CollieError(f"{source} is corrupted ({e}); re-create it with "
                              "`collie-compile plan ... --out`") from None
        if priced is not None and priced != as_written:
            raise CollieError(f"{source} was edited after it was priced: its memory and time "
                              f"figures are for another plan. To choose a layout, pin it: "
                              f"{plan.replan_command()}")
        return plan

    def _check_sizes(self) -> None:
        c = self.chosen
        if c is None:
            return
        if c.dp * c.tp * c.pp != self.gpus:
            raise ValueError(f"dp*tp*pp = {c.dp * c.tp * c.pp} but gpus = {self.gpus}")
        if c.ep < 1 or c.dp % c.ep:
            raise ValueError(f"ep = {c.ep} does not divide dp = {c.dp}")
        if c.dp * c.micro_batch_size * c.num_microbatches != self.global_batch_size:
            raise ValueError(f"dp x micro-batch x micro-batches = {c.dp} x "
                             f"{c.micro_batch_size} x {c.num_microbatches} but the global "
                             f"batch is {self.global_batch_size}")

    def replan_command(self) -> str:
        """The ``collie-compile plan`` command that pins this plan's chosen layout."""
        c = self.chosen
        # a GPU from a spec file is saved by its name, which --gpu does not know
        gpu = self.gpu if self.gpu in CATALOG else "SPEC.json"
        args = [f"collie-compile plan {self.model} --gpus {self.gpus} --gpu {gpu}",
                f"--gpus-per-node {self.gpus_per_node} --seq-len {self.seq_len}",
                f"--global-batch {self.global_batch_size} --optimizer {self.optimizer}",
                f"--dtype {self.dtype}"]
        if self.lora_rank:
            args.append(lora_flags(self.lora_rank, self.lora_targets))
        if self.max_grad_norm is not None:
            args.append(f"--max-grad-norm {self.max_grad_norm} --clip-mode {self.clip_mode}")
        if c is not None:
            # no --zero with dp=1: ZeRO shards over dp ranks, and the planner refuses it
            zero = f" --zero {c.zero}" if c.dp > 1 else ""
            ep = f" --ep {c.ep}" if c.ep > 1 else ""
            args.append(f"--dp {c.dp} --tp {c.tp} --pp {c.pp}{ep}{zero} "
                        f"--micro-batch {c.micro_batch_size}")
            if c.pp > 1:
                args.append(f"--schedule {c.schedule}")
            if c.virtual_stages > 1:
                args.append(f"--virtual-stages {c.virtual_stages}")
            if len(set(c.recompute)) == 1:
                args.append(f"--recompute {c.recompute[0]}")
            if c.update_in_backward:
                args.append("--update-in-backward")
        args.append("--out FILE")
        if gpu != self.gpu:  # a shell comment: the command still pastes
            args.append(f"  # SPEC.json: {self.gpu}'s spec, as `collie-compile calibrate "
                        "--out SPEC.json` writes it on that GPU")
        return " ".join(args)

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves half a plan file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise CollieError(f"cannot read plan {path}: {e.strerror}") from None
        return cls.from_json(text, source=str(path))


FORMAT = 1  # the plan file format this version writes and reads


def lora_flags(rank: int | None, targets: str | list[str] | None) -> str:
    """The ``plan``/``train`` flags of a LoRA setting ("no --lora-rank": full training)."""
    if rank is None:
        return "no --lora-rank"
    t = canonical_lora_targets(targets)
    return f"--lora-rank {rank} --lora-targets {t if isinstance(t, str) else ' '.join(t)}"


def _fingerprint(data: dict) -> str:
    """A digest of what the cost model priced (request and layouts, not the prose)."""
    import hashlib

    priced = {k: v for k, v in data.items() if k not in ("suggestions", "notes")}
    return hashlib.sha256(json.dumps(priced, sort_keys=True).encode()).hexdigest()[:16]


def _check_keys(cls: type, data: dict) -> None:
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown fields {unknown}")


def _candidate(d: dict) -> Candidate:
    if not isinstance(d, dict):
        raise ValueError("a candidate must be an object")
    _check_keys(Candidate, d)
    c = Candidate(**d)
    if min(c.dp, c.tp, c.pp, c.micro_batch_size, c.num_microbatches, c.virtual_stages) < 1:
        raise ValueError("sizes must be positive")
    if len(c.stages) != c.pp:
        raise ValueError("stages do not match pp")
    if c.zero not in (0, 1, 2, 3):
        raise ValueError(f"zero={c.zero} is not 0-3")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {c.schedule!r}")
    if set(c.recompute) - set(RECOMPUTE):
        raise ValueError(f"unknown recompute modes {sorted(set(c.recompute) - set(RECOMPUTE))}")
    first = 0
    for a, b in c.stages:  # contiguous, covering every layer once
        if a != first or b < a:
            raise ValueError("stages are not contiguous layer ranges")
        first = b + 1
    if first != len(c.recompute):
        raise ValueError(f"stages cover {first} layers but recompute lists "
                         f"{len(c.recompute)}")
    return c
