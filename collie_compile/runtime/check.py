"""Translation validation: a layout run on CPU processes against one process, per tensor.

``collie-compile check MODEL`` and the conformance suite (``python -m benchmarks zoo``)
share this module. A *case* is a model config (a small probe of the user's model, see
:func:`collie_compile.models.probe.probe_config`) and a layout. For each case every rank of a
torchrun job (gloo) loads the same initial weights with ``from_pretrained`` (as users
do), trains ``STEPS`` AdamW steps with :func:`collie_compile.parallelize`, and writes a
Hugging Face checkpoint with ``save_pretrained``; rank 0 then trains plain transformers
in one process on the same batches and compares the losses and *every* saved tensor,
reloaded with plain transformers (or peft for LoRA), by ‖Δ‖/‖W‖. A loss that agrees
says little: a wrong gradient on a small tensor (a norm weight) hides behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from collie_compile.errors import CollieError, first_line
from collie_compile.passes.lora import is_svd

STEPS, SEQ, BATCH = 3, 16, 8
# AdamW with eps 1e-6, not 1e-8: an element whose gradient is ~0 would otherwise move by
# up to ±lr on rounding noise alone, and any reordering of a sum shows as a weight error.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
# fp32. Losses to 1e-5; every tensor to ‖Δ‖/‖W‖ <= 1e-4: a zero-initialised tensor
# (biases, Gemma's 1 + w norms) is three AdamW steps of ~lr, where reordered sums show
# as 2-3e-5; the bugs this catches are 2e-3 (an unsummed norm gradient) and up.
TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4
PERTURBATION, SENSITIVITY_MARGIN = 1e-7, 10.0
LORA_RANK = 4

# The layouts a check runs when none is pinned: each parallel mechanism once.
LAYOUTS: dict[str, dict] = {
    "single": dict(dp=1, tp=1, pp=1, zero=0),
    "dp2-zero3": dict(dp=2, tp=1, pp=1, zero=3),
    "tp2": dict(dp=1, tp=2, pp=1, zero=0),
    # four micro-batches of 2: the 1F1B schedule's steady state, not only warm-up/drain
    "pp2": dict(dp=1, tp=1, pp=2, zero=0, schedule="1f1b", micro_batch_size=2),
    "tp2-pp2": dict(dp=1, tp=2, pp=2, zero=0, schedule="1f1b", micro_batch_size=2),
    "lora-tp2": dict(dp=1, tp=2, pp=1, zero=0, lora=True),
}
# And for mixtures of experts, expert parallelism: experts split over 2 of the dp ranks
EP_LAYOUTS: dict[str, dict] = {
    "ep2": dict(dp=2, tp=1, pp=1, zero=0, ep=2),
    "ep2-pp2": dict(dp=2, tp=1, pp=2, zero=0, ep=2, schedule="1f1b", micro_batch_size=2),
    "tp2-ep2": dict(dp=2, tp=2, pp=1, zero=0, ep=2),
    "dp2-zero3-ep2": dict(dp=2, tp=1, pp=1, zero=3, ep=2),
    "lora-ep2": dict(dp=2, tp=1, pp=1, zero=0, ep=2, lora=True),
}


@dataclass
class Case:
    """One model under one layout: plain data, sent to the workers as JSON."""

    id: str
    config: dict  # PretrainedConfig.to_dict() of the probe
    layout: dict  # dp, tp, pp, zero, schedule, recompute, lora
    seq: int = SEQ  # the run's sequence length and global batch (shapes a pass may get
    batch: int = BATCH  # right by chance at one size are tried at another)

    @property
    def nproc(self) -> int:
        return self.layout["dp"] * self.layout["tp"] * self.layout["pp"]


@dataclass
class Result:
    """What a case gave: ``status`` is "pass", "fail" (numbers disagree), "refused"
    (a CollieError: a limit named at plan time) or "crash" (a bug)."""

    id: str
    status: str
    reason: str = ""
    loss_err: float = 0.0
    worst_tensor: str = ""
    worst_err: float = 0.0
    tensor_errs: dict[str, float] = field(default_factory=dict)
    # tensors whose gradient is zero up to rounding in the reference (a key bias: softmax
    # ignores a shift of the keys), so both runs move them by noise: listed, not judged
    noise_only: list[str] = field(default_factory=list)
    # elements of other tensors with such a gradient (the unrotated dims of a key norm's
    # bias under partial rotary), left out of those tensors' errors
    noise_elements: int = 0
    # where the layout is off by more than the tolerances: how far a one-process run
    # moves when its initial weights change by 1e-7 (relative), per tensor and in loss.
    # A model whose training is that sensitive (Doge's top-k dynamic mask) passes if
    # every error is within SENSITIVITY_MARGIN times its own floor.
    sensitivity: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        return cls(**d)


def batches(vocab: int, n: int = STEPS, seq: int = SEQ, batch: int = BATCH
            ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def tensor_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  skip: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """‖got - want‖ / ‖want‖ per tensor (a tensor missing or misshapen counts as 1),
    leaving out the elements ``skip`` marks (boolean masks by name)."""
    out = {}
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            out[name] = 1.0
            continue
        diff = g.double() - w.double()
        mask = (skip or {}).get(name)
        if mask is not None and mask.shape == diff.shape:
            diff = diff.masked_fill(mask, 0.0)
        out[name] = float(diff.norm() / max(float(w.double().norm()), 1e-12))
    return out


def _initial_model(config: dict, directory: Path) -> None:
    """Build the model from its config as users do and save its initial weights."""
    from transformers import AutoModelForCausalLM

    from collie_compile.models.registry import config_from_dict

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_from_dict(config, "probe"))
    model.save_pretrained(directory)


def _lora_config(**fields: object) -> object:
    """LoRA on all linears, and ``fields`` (e.g. ``target_parameters``) as given; with
    ``peft_type`` another peft method's config of ``fields`` (peft's defaults beside)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, LoraConfig

    kind = fields.pop("peft_type", "LORA")
    if kind != "LORA":
        return PEFT_TYPE_TO_CONFIG_MAPPING[kind](**fields)
    return LoraConfig(**{"r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
                         "target_modules": "all-linear", "lora_dropout": 0.0, **fields})


def _lora_init(base: Path, directory: Path, fields: dict) -> None:
    """A PEFT adapter with random A and B (peft starts B at zero, which would hide a
    wrong gradient of A for a step), and magnitudes and IA3 vectors moved off their
    init by 5%; ``fields`` of its config beside the defaults (:func:`_lora_config`)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    # on a mixture of experts, all-linear also adapts routers' weights and the experts
    # banks (peft's target_parameters) where peft knows the family
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           _lora_config(**dict(fields)))
    gen = torch.Generator().manual_seed(7)
    for n, p in model.named_parameters():
        if "lora_magnitude_vector" in n or "ia3_l" in n:
            p.data = p.data * (1 + 0.05 * torch.randn(p.shape, generator=gen))
        elif "lora_" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    model.save_pretrained(directory)


def _trainable_peft_model(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """peft's model of ``adapter`` on ``model``, to train on. peft will not load a prompt
    method's adapter as trainable: that one is a fresh peft model given its prompts."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter))
    if not config.is_prompt_learning:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    config.inference_mode = False
    model = get_peft_model(model, config)
    set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    return model


def _reference(base: Path, data: list[torch.Tensor], adapter: Path | object | None,
               perturb: float = 0.0, micro_batch: int | None = None
               ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain transformers (and peft) in one process: losses, final tensors, and masks of
    the elements whose gradient is rounding noise (by parameter name). ``perturb`` scales
    each trainable initial weight by 1 + perturb·N(0, 1) (fixed seed) first: the run's
    own sensitivity to rounding-sized changes. A model with a router loss runs each
    batch as transformers under gradient accumulation does: ``micro_batch`` rows a
    forward call, the loss their mean (every row holds as many tokens). ``adapter``: a
    saved adapter's folder, or a P-tuning config, started as the run starts it; its
    tensors then are the prompts peft saves (the encoder's output), not the encoder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if isinstance(adapter, Path):
        model = _trainable_peft_model(model, adapter)
    elif adapter is not None:  # P-tuning: peft's encoder at the run's init
        from peft import get_peft_model

        from collie_compile.models.prompts import make_encoder
        from collie_compile.runtime.options import with_peft_defaults

        start = make_encoder(with_peft_defaults(adapter, model), model).state_dict()
        model = get_peft_model(model, adapter)
        model.prompt_encoder["default"].load_state_dict(start)
    model.train()
    if perturb:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1 + perturb * torch.randn(p.shape, generator=gen))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    adalora = isinstance(adapter, Path) and is_svd(model.peft_config["default"])
    losses, grads = [], {}
    for step, b in enumerate(data):
        opt.zero_grad(set_to_none=True)
        calls = (b.split(micro_batch) if getattr(model.config, "output_router_logits", False)
                 else [b])
        loss = sum(model(input_ids=c, labels=c, use_cache=False).loss
                   for c in calls) / len(calls)
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                g = p.grad.detach().abs()
                grads[n] = torch.maximum(grads[n], g) if n in grads else g
        opt.step()
        if adalora:  # after the update, from its gradients (peft's docstring loop)
            model.base_model.update_and_allocate(step)
        losses.append(float(loss))
    # elements whose gradient stayed at rounding level (1e-7 of the largest anywhere) but
    # is not exactly 0: an exact 0 (a padding row) leaves only weight decay, judged as is
    top = max((float(g.max()) for g in grads.values() if g.numel()), default=0.0)
    noise = {n: (g <= 1e-7 * top) & (g > 0) for n, g in grads.items()}
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if adalora:  # as peft saves it: each adapter cut to the ranks it kept
        with tempfile.TemporaryDirectory() as saved:
            model.save_pretrained(saved)
            final = _reload(Path(saved), base, True)
    if adapter is not None and not isinstance(adapter, Path):
        final = {k: v for k, v in final.items() if not k.startswith("prompt_encoder.")}
        final["prompt_encoder.default.embedding.weight"] = \
            model.get_prompt_embedding_to_save("default")
    return losses, final, {n: m for n, m in noise.items() if bool(m.any())}


def _reload(directory: Path, base: Path, lora: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory)
    # AdaLoRA's ranknum is peft's constant, not saved (nor trained)
    return {k: v.detach() for k, v in model.state_dict().items() if ".ranknum." not in k}


def run_case(case: Case, workdir: Path) -> Result:
    """Every rank: train the case with ``parallelize``; rank 0 compares. A collective."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from collie_compile.runtime.distributed import all_strings
    from collie_compile.runtime.parallel_model import parallelize

    d = workdir / case.id
    base, adapter, out = d / "init", d / "adapter-init", d / "trained"
    lora = bool(case.layout.get("lora"))  # True, or LoraConfig fields beside the defaults
    fields = case.layout["lora"] if isinstance(case.layout.get("lora"), dict) else {}
    # P-tuning cannot start from a saved adapter (peft saves its prompts, not its
    # encoder): the run draws the encoder itself, and the reference the same
    fresh = (_lora_config(**dict(fields)) if fields.get("peft_type") == "P_TUNING"
             or fields.get("prefix_projection") else None)
    pins = {k: v for k, v in case.layout.items() if k != "lora"}
    problem = ""
    if dist.get_rank() == 0:
        try:
            d.mkdir(parents=True, exist_ok=True)
            _initial_model(case.config, base)
            if lora and fresh is None:
                _lora_init(base, adapter, fields)
        except Exception as e:  # the model itself does not build: not ours to judge
            problem = first_line(e)
    problem = all_strings(problem)[0]
    if problem:
        return Result(case.id, "crash", f"transformers cannot build the probe: {problem}")
    model = AutoModelForCausalLM.from_pretrained(base)
    data = batches(int(model.config.vocab_size), seq=case.seq, batch=case.batch)
    try:
        pm = parallelize(model, seq_len=case.seq, global_batch_size=case.batch, optimizer="adamw",
                         lr=ADAMW["lr"], optimizer_kwargs={"eps": ADAMW["eps"]},
                         lora_adapter=adapter if lora and fresh is None else None,
                         peft=fresh, **pins)
    except CollieError as e:
        return Result(case.id, "refused", str(e))
    losses = [pm.train_step({"input_ids": b}) for b in data]
    pm.save_pretrained(out)
    if dist.get_rank() != 0:
        return Result(case.id, "pass")
    try:
        start = fresh or (adapter if lora else None)
        ref_losses, want, noise = _reference(base, data, start,
                                             micro_batch=pm.plan.chosen.micro_batch_size)
    except Exception as e:  # transformers or peft fail on their own: nothing to judge by
        return Result(case.id, "crash", f"the reference itself (transformers/peft in one "
                                        f"process) fails: {first_line(e)}")
    masks = {k: noise[_param_name(k)] for k in want if _param_name(k) in noise}
    errs = tensor_errors(_reload(out, base, lora), want, masks)
    whole = sorted(k for k, m in masks.items() if bool(m.all()))
    partly = sum(int(m.sum()) for k, m in masks.items() if k not in whole)
    judged = {k: v for k, v in errs.items() if k not in whole} or errs
    worst = max(judged, key=judged.get)
    loss_err = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    ok = loss_err <= TOLERANCE and errs[worst] <= WEIGHT_TOLERANCE
    floor: dict[str, float] = {}
    if not ok:  # off: by more than the model itself moves on rounding-sized changes?
        moved_losses, moved, _ = _reference(base, data, start,
                                            PERTURBATION, pm.plan.chosen.micro_batch_size)
        floor = tensor_errors(moved, want, masks)
        floor["loss"] = max(abs(a - b) for a, b in zip(moved_losses, ref_losses, strict=True))
        limit = {k: max(WEIGHT_TOLERANCE, SENSITIVITY_MARGIN * floor[k]) for k in judged}
        ok = (loss_err <= max(TOLERANCE, SENSITIVITY_MARGIN * floor["loss"])
              and all(judged[k] <= limit[k] for k in judged))
        if ok:
            return Result(case.id, "pass", (
                f"within the model's own sensitivity: a {PERTURBATION:.0e} change of the "
                f"one-process initial weights moves {worst} by {floor[worst]:.1e} "
                f"(here {errs[worst]:.1e}) and the loss by {floor['loss']:.1e} (here "
                f"{loss_err:.1e})"), loss_err, worst, errs[worst], errs, whole, partly, floor)
        worst = max(judged, key=lambda k: judged[k] / limit[k])  # nearest its limit
    return Result(case.id, "pass" if ok else "fail", "" if ok else (
        f"{worst}: ‖Δ‖/‖W‖ = {errs[worst]:.1e}" + (
            f", {errs[worst] / floor[worst]:.0f}x the model's own sensitivity"
            if floor.get(worst) else "") if errs[worst] > WEIGHT_TOLERANCE
        else f"loss off by {loss_err:.1e}"), loss_err, worst, errs[worst], errs, whole,
                  partly, floor)


def _param_name(state_key: str) -> str:
    """A state-dict key as named_parameters names it (peft adds ``.default``)."""
    return state_key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")


def _worker(cases_file: str, out_file: str, workdir: str) -> None:
    """Under torchrun: run each case, rank 0 appends its result to ``out_file`` (JSON
    lines) as soon as it has it, so an interrupted run resumes where it stopped."""
    from datetime import timedelta

    import torch.distributed as dist

    # a rank that crashes mid-collective must not leave the others waiting for 30 minutes
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    from collie_compile.runtime.distributed import all_strings

    for raw in json.loads(Path(cases_file).read_text()):
        case = Case(**raw)
        try:
            result = run_case(case, Path(workdir))
        except Exception as e:  # a bug: record it and go on with the next case
            traceback.print_exc()
            result = Result(case.id, "crash", f"{first_line(e)} | "
                            + traceback.format_exc(limit=-3).replace("\n", " | "))
        # one verdict per case: a rank that failed makes the case fail everywhere
        verdicts = [json.loads(t) for t in all_strings(json.dumps(asdict(result)))]
        worst = next((v for v in verdicts if v["status"] in ("crash", "refused")), verdicts[0])
        if dist.get_rank() == 0:
            with open(out_file, "a") as f:
                f.write(json.dumps(worst if worst["status"] != "pass" else verdicts[0]) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def launch(cases: list[Case], out_file: Path, workdir: Path, timeout: float = 1800,
           module: str = "collie_compile.runtime.check") -> list[Result]:
    """Run ``cases`` (all of one process count) in one torchrun launch on CPU (gloo);
    results are appended to ``out_file``; cases already there are skipped. ``module`` is
    the worker (this one; tests pass one with a pass broken on purpose)."""
    done = {r.id for r in read_results(out_file)}
    todo = [c for c in cases if c.id not in done]
    while todo:
        nproc = {c.nproc for c in todo}
        if len(nproc) != 1:
            raise ValueError(f"one launch runs one process count, got {sorted(nproc)}")
        workdir.mkdir(parents=True, exist_ok=True)
        spec = workdir / f"cases-{os.getpid()}.json"
        spec.write_text(json.dumps([asdict(c) for c in todo]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc.pop()}", "-m", module,
               "--cases", str(spec), "--out", str(out_file), "--workdir", str(workdir)]
        log = workdir / f"launch-{os.getpid()}.log"
        with open(log, "w") as f:
            subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
        got = {r.id for r in read_results(out_file)}
        todo = [c for c in todo if c.id not in got]
        if todo:  # the launch died on its first unfinished case: record it, go on
            tail = [ln for ln in log.read_text().splitlines() if "Error" in ln][-2:]
            with open(out_file, "a") as f:
                f.write(json.dumps(asdict(Result(todo[0].id, "crash", "the launch died ("
                                                 + f"{log}): " + " | ".join(tail)))) + "\n")
            todo = todo[1:]
    want = {c.id for c in cases}
    return [r for r in read_results(out_file) if r.id in want]


def run_cases(cases: list[Case], out_file: Path, workdir: Path, **kwargs: object
              ) -> list[Result]:
    """:func:`launch` once per process count, in the order of ``cases``."""
    counts = sorted({c.nproc for c in cases})
    for n in counts:
        launch([c for c in cases if c.nproc == n], out_file, workdir, **kwargs)
    by_id = {r.id: r for r in read_results(out_file)}
    return [by_id[c.id] for c in cases]


def check_model(cfg: object, layouts: dict[str, dict], layers: int = 2,
                workdir: Path | None = None) -> list[Result]:
    """Check ``cfg`` (a transformers config) under each named layout, on a probe with
    ``layers`` blocks and narrow widths that keep its head structure, without dropout."""
    from collie_compile.models.probe import probe_config

    probe = probe_config(cfg, layers=layers, no_dropout=True)
    cases = [Case(name, probe.to_dict(), layout) for name, layout in layouts.items()]
    if workdir is not None:  # kept: the checkpoints and results stay for a look
        return run_cases(cases, Path(workdir) / "results.jsonl", Path(workdir))
    with tempfile.TemporaryDirectory(prefix="collie-check-") as tmp:
        return run_cases(cases, Path(tmp) / "results.jsonl", Path(tmp))


def report(results: list[Result], all_tensors: bool = False) -> str:
    """One block per layout: its verdict, loss difference and worst tensors."""
    lines = []
    for r in results:
        verdict = {"pass": "PASS", "fail": "FAIL", "refused": "REFUSED",
                   "crash": "CRASH"}[r.status]
        lines.append(f"{r.id:<12} {verdict}" + (f"  loss Δ {r.loss_err:.1e}, worst tensor "
                                                f"{r.worst_tensor} ‖Δ‖/‖W‖ {r.worst_err:.1e}"
                                                if r.tensor_errs else "")
                     + (f"\n    {r.reason}" if r.reason else ""))
        if r.noise_only:
            lines.append(f"    not judged (zero gradient up to rounding): "
                         f"{', '.join(r.noise_only)}")
        if r.noise_elements:
            many = "s" if r.noise_elements > 1 else ""
            lines.append(f"    {r.noise_elements} element{many} of other tensors not judged "
                         "(zero gradient up to rounding)")
        shown = sorted(((k, v) for k, v in r.tensor_errs.items() if k not in r.noise_only),
                       key=lambda kv: -kv[1])
        for name, err in shown if all_tensors else shown[:3]:
            own = r.sensitivity.get(name, 0.0)
            over = err > max(WEIGHT_TOLERANCE, SENSITIVITY_MARGIN * own)
            lines.append(f"    {err:9.1e}  {name}" + (f"  (own sensitivity {own:.1e})"
                                                      if own else "")
                         + ("  <-- over" if over else ""))
    return "\n".join(lines)


def read_results(path: Path) -> list[Result]:
    if not Path(path).exists():
        return []
    return [Result.from_dict(json.loads(ln)) for ln in Path(path).read_text().splitlines()
            if ln.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    _worker(args.cases, args.out, args.workdir)


if __name__ == "__main__":
    main()
