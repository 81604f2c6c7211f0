"""The ``collie-compile`` command line: models, gpus, estimate, plan, calibrate, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict

from collie_compile.config import Pins
from collie_compile.cost.estimate import estimate, resolve_sizes
from collie_compile.cost.hardware import CATALOG, GiB, get_gpu
from collie_compile.cost.memory import estimate_json
from collie_compile.data.records import ON_ERROR
from collie_compile.dtypes import DTYPE_NAMES
from collie_compile.errors import CollieError
from collie_compile.layout import EXPERT_IMBALANCE, RECOMPUTE, SCHEDULES, canonical_lora_targets
from collie_compile.models.presets import PRESETS
from collie_compile.optim.schedules import SCHEDULES as LR_SCHEDULES
from collie_compile.optim.specs import CLIP_MODES, OPTIMIZERS
from collie_compile.planner.search import plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"collie-compile: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _bytes(n: float, total: float) -> str:
    """GiB, or MiB when the whole table is under 1 GiB (small models read 0.00 GiB)."""
    if total < GiB:
        return f"{n / 2**20:8.2f} MiB"
    return f"{n / GiB:8.2f} GiB"


def _size(n: float) -> str:
    """One figure in the unit that shows it (a small spec's 0.00 GiB read as nothing)."""
    return _bytes(n, n).strip()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def cmd_models(args: argparse.Namespace) -> int:
    from collie_compile.models.registry import build_model, count_params, load_config

    rows = []
    for name, preset in PRESETS.items():
        cfg = load_config(name)
        rows.append(dict(name=name, family=preset.model_type, params=count_params(
            build_model(cfg)), layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            vocab=cfg.vocab_size, source=preset.source))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':16} {'family':8} {'params':>15} {'layers':>6} {'hidden':>6} "
          f"{'heads':>5} {'kv':>3} {'vocab':>7}  config from")
    for r in rows:
        print(f"{r['name']:16} {r['family']:8} {r['params']:>15,} {r['layers']:>6} "
              f"{r['hidden']:>6} {r['heads']:>5} {r['kv_heads']:>3} {r['vocab']:>7}  "
              f"{r['source']}")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    if args.name:  # one spec: a file --gpu takes as it is, to edit for another card
        print(json.dumps(asdict(get_gpu(args.name)), indent=2))
        return 0
    if args.json:
        print(json.dumps([asdict(g) for g in CATALOG.values()], indent=2))
        return 0
    print(f"{'gpu':10} {'memory':>10} {'bf16 TF':>8} {'fp32 TF':>8} {'HBM GB/s':>9} "
          f"{'intra GB/s':>10} {'inter GB/s':>10}")
    for g in CATALOG.values():
        print(f"{g.name:10} {g.memory_bytes / GiB:7.1f} GiB {g.bf16_flops / 1e12:8.1f} "
              f"{g.fp32_flops / 1e12:8.1f} {g.hbm_bandwidth / 1e9:9.0f} "
              f"{g.intra_node_bandwidth / 1e9:10.1f} {g.inter_node_bandwidth / 1e9:10.1f}")
    print("\nAny other GPU: --gpu SPEC.json, a file with the same fields; start from one "
          "(`collie-compile gpus h100-80gb > SPEC.json`) or measure it (`calibrate --out`).")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    m = args.num_microbatches
    if args.global_batch is not None:  # plan's way of saying it: micro-batches follow
        dp, _, _ = resolve_sizes(args.gpus, args.dp, args.tp, args.pp)
        share = dp * args.micro_batch
        if args.global_batch % share or (m is not None and m * share != args.global_batch):
            raise CollieError(f"--global-batch {args.global_batch} is not dp x micro-batch x "
                              f"micro-batches = {dp} x {args.micro_batch} x "
                              f"{m or 'n'}; give a multiple of {share}")
        m = args.global_batch // share
    est = estimate(args.model, gpus=args.gpus, gpu=args.gpu, dp=args.dp, tp=args.tp,
                   pp=args.pp, zero=args.zero, micro_batch_size=args.micro_batch,
                   num_microbatches=m, seq_len=args.seq_len,
                   recompute=args.recompute, optimizer=args.optimizer, dtype=args.dtype,
                   schedule=args.schedule, lora_rank=args.lora_rank,
                   lora_targets=args.lora_targets, memory_reserve=args.memory_reserve,
                   virtual_stages=args.virtual_stages,
                   tp_refusal=_tp_refusal(args.model) if args.tp > 1 else None,
                   update_in_backward=args.update_in_backward, ep=args.ep)
    mem, lay = est.memory, est.layout
    if args.json:
        print(estimate_json(est.model, est.num_params, est.trainable_params, est.gpu.name,
                            est.gpu.memory_bytes, est.usable_bytes, lay, est.optimizer,
                            est.dtype, mem, est.update_in_backward, est.active_params))
        return 0
    cap = est.gpu.memory_bytes
    active = ("" if est.active_params is None
              else f" ({_count(est.active_params)} active a token: routed experts, k of E)")
    print(f"{est.model}: {_count(est.num_params)} parameters{active}, "
          f"{_count(est.trainable_params)} trainable")
    optional = not OPTIMIZERS[est.optimizer].fused_backward  # LOMO, AdaLomo: always inside
    where = " updated inside backward" if est.update_in_backward and optional else ""
    print(f"{lay.gpus} x {est.gpu.name} ({cap / GiB:.1f} GiB each), {est.optimizer}{where}, "
          f"{est.dtype}")
    print(f"layout: dp={lay.dp} tp={lay.tp} pp={lay.pp}"
          + (f" ep={lay.ep}" if lay.ep > 1 else "") + f" zero={lay.zero} "
          f"micro-batch={lay.micro_batch_size} x {lay.num_microbatches} seq={lay.seq_len} "
          f"recompute={lay.recompute}" + (f" schedule={lay.schedule}" if lay.pp > 1 else "")
          + (f" (v={lay.virtual_stages})" if lay.virtual_stages > 1 else ""))
    where = f"pipeline stage {mem.stage}, " if lay.pp > 1 else ""
    moment = "start of backward" if mem.moment == "backward" else "optimizer step"
    print(f"\nper GPU at its peak ({where}{moment}):")
    for label, value in [("params", mem.params_bytes), ("grads", mem.grads_bytes),
                         ("optimizer states", mem.optimizer_bytes),
                         ("activations", mem.activations_bytes), ("other", mem.other_bytes)]:
        print(f"  {label:18}{_bytes(value, mem.total_bytes)}")
    verdict = "fits" if est.fits else "DOES NOT FIT"
    print(f"  {'total':18}{_bytes(mem.total_bytes, mem.total_bytes)}   {verdict} "
          f"({100 * mem.total_bytes / cap:.0f}% of {cap / GiB:.1f} GiB; "
          f"{_size(est.usable_bytes)} usable with {100 * est.memory_reserve:g}% kept free)")
    return 0


def _check_writable(path: str) -> None:
    """Fail before minutes of work, not after, if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CollieError(f"--out {path} is a directory; give a file name, e.g. "
                          f"{os.path.join(path, 'plan.json')}")
    if not os.path.isdir(folder):
        raise CollieError(f"--out {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CollieError(f"--out {path}: folder {folder} is not writable")


def _tp_refusal(model: str) -> str | None:
    from collie_compile.runtime.refusals import tp_refusal  # cached; a dry run when not

    return tp_refusal(model)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.out:
        _check_writable(args.out)
    result = plan(args.model, gpus=args.gpus, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
                  seq_len=args.seq_len, global_batch_size=args.global_batch,
                  optimizer=args.optimizer, dtype=args.dtype, lora_rank=args.lora_rank,
                  memory_reserve=args.memory_reserve, top_k=args.top,
                  lora_targets=args.lora_targets, **Pins.from_args(args).given(),
                  tp_refusal=_tp_refusal(args.model) if args.gpus > 1 and args.tp != 1
                  else None, update_in_backward=args.update_in_backward,
                  max_grad_norm=args.max_grad_norm, clip_mode=args.clip_mode,
                  expert_imbalance=args.expert_imbalance)
    if args.out:
        result.save(args.out)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
        return 0 if result.feasible else 3
    c = result.chosen
    lora = ""
    if result.lora_rank:
        t = canonical_lora_targets(result.lora_targets)
        lora = f", LoRA r={result.lora_rank} on {t if isinstance(t, str) else ' '.join(t)}"
    print(f"{result.model} on {result.gpus} x {result.gpu} ({result.gpus_per_node} per node), "
          f"{result.optimizer}{lora}, {result.dtype}, seq {result.seq_len}, global batch "
          f"{result.global_batch_size}")
    head = "plan" if result.feasible else "NO PLAN FITS; the closest"
    print(f"{head} (solved in {result.solve_time_s:.2f} s by {result.solver}):")
    print(f"  {c.layout_str()}")
    if c.virtual_stages == 1:
        print("  stages (layers): " + " ".join(f"{a}-{b}" for a, b in c.stages))
    else:  # each rank holds v chunks, spread over the model
        print("  layers per pp rank: " + "; ".join(
            ",".join(f"{a}-{b}" for a, b in rank) for rank in c.layers_per_rank()))
    if c.sharding:
        print("  sharding: " + ", ".join(f"{m.rsplit('.', 1)[-1]}={s}"
                                         for m, s in c.sharding.items()))
    print(f"  step time {c.step_time_s:.3f} s, {c.tokens_per_gpu_per_s:,.0f} tokens/s/GPU, "
          f"MFU {100 * c.mfu:.1f}%")
    fullest = max(range(len(c.memory)), key=lambda k: c.memory[k]["total_bytes"])
    m = c.memory[fullest]
    where = f"stage {fullest}, " if c.pp > 1 else ""
    moment = "start of backward" if m["moment"] == "backward" else "optimizer step"
    print(f"memory per GPU ({where}{moment}):")
    for label, key in [("params", "params_bytes"), ("grads", "grads_bytes"),
                       ("optimizer states", "optimizer_bytes"),
                       ("activations", "activations_bytes"), ("other", "other_bytes"),
                       ("total", "total_bytes")]:
        print(f"  {label:18}{_bytes(m[key], m['total_bytes'])}")
    if not result.feasible:
        print(f"\ndoes not fit: the closest plan needs {_size(c.memory_per_gpu_bytes)} per GPU, "
              f"{_size(result.shortfall_bytes)} more than the "
              f"{_size(result.usable_memory_bytes)} usable. What would fit:")
        for s in result.suggestions:
            print(f"  - {s}")
        return 3
    if result.alternatives:
        print("runners-up:")
        for i, a in enumerate(result.alternatives, 1):
            print(f"  {i}. {a.layout_str()}\n     {a.why_not}")
    for note in result.notes:
        print(f"note: {note}")
    if args.out:
        print(f"plan written to {args.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from collie_compile.cost.calibrate import calibrate  # spawns processes: import only when asked

    if args.out:
        _check_writable(args.out)
    spec = calibrate(name=args.name, quick=args.quick)
    text = spec.to_json()
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}: use it as --gpu {args.out}")
    print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from collie_compile.training.run import TrainConfig, train

    pins = Pins.from_args(args)
    cfg = TrainConfig(model=args.model, data=args.data, steps=args.steps, seq_len=args.seq_len,
                      text_field=args.text_field, bad_records=args.bad_records,
                      eval_data=args.eval_data, eval_split=args.eval_split,
                      eval_every=args.eval_every, lr_schedule=args.lr_schedule,
                      warmup_steps=args.warmup_steps, decay_steps=args.decay_steps,
                      min_lr=args.min_lr, output=args.output, save_every=args.save_every,
                      keep_last=args.keep_last, tensorboard=args.tensorboard,
                      global_batch_size=args.global_batch, optimizer=args.optimizer,
                      dtype=args.dtype,
                      lr=args.lr, plan=args.plan, gpu=args.gpu, tokenizer=args.tokenizer,
                      weights=args.weights, save=args.save, seed=args.seed, pins=pins,
                      check=args.check, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_targets=args.lora_targets, merge=args.merge, peft=args.peft,
                      peft_adapter=args.peft_adapter,
                      memory_reserve=args.memory_reserve,
                      update_in_backward=args.update_in_backward,
                      max_grad_norm=args.max_grad_norm, clip_mode=args.clip_mode,
                      fresh_optimizer=args.fresh_optimizer,
                      separate_documents=args.separate_documents)
    ours = not dist.is_initialized()  # a caller's group outlives the command
    try:
        losses = train(cfg)
        if dist.get_rank() == 0 and losses:
            print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
        elif dist.get_rank() == 0:
            print(f"nothing to do: {cfg.output} holds a checkpoint at or past step "
                  f"{cfg.steps}")
    finally:
        # also when refused: a group left to the interpreter's exit could abort the
        # worker ("terminate called without an active exception") and turn its exit
        # status 2 into 1
        if ours and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from collie_compile.models.probe import family_kind
    from collie_compile.models.registry import load_config, model_name
    from collie_compile.runtime.check import EP_LAYOUTS, LAYOUTS, check_model, report

    pins = Pins.from_args(args).given()
    inside = {"update_in_backward": True} if args.update_in_backward else {}
    cfg = load_config(args.model)
    if not pins and (args.lora or inside):
        # without pins this compared one process with one process and said PASS
        pins = {"tp": 2}
    if pins or args.lora or inside:
        layout = {"dp": 1, "tp": 1, "pp": 1, "zero": 0, **pins}
        if layout["pp"] > 1:
            layout.setdefault("schedule", "1f1b")
        name = "-".join(f"{k}{v}" for k, v in pins.items()) or "single"
        name += ("-lora" if args.lora else "") + ("-inside" if inside else "")
        layouts = {name: {**layout, "lora": args.lora, **inside}}
    else:  # each mechanism once; expert parallelism too for a mixture of experts
        layouts = {k: v for k, v in LAYOUTS.items() if k != "single"}
        if family_kind(cfg) == "moe":
            layouts |= EP_LAYOUTS
    layers = max(args.layers, max(v["pp"] for v in layouts.values()))
    print(f"checking {model_name(cfg)} on a {layers}-layer probe against one process "
          f"({', '.join(layouts)}; CPU processes on gloo)...", flush=True)
    results = check_model(cfg, layouts, layers=layers, workdir=args.workdir)
    print(report(results, args.all_tensors))
    bad = [r for r in results if r.status in ("fail", "crash")]
    print(f"{len(results) - len(bad)} passed or refused with a reason, {len(bad)} failed")
    return 1 if bad else 0


LORA_TARGETS_HELP = "modules that get adapters, as peft's target_modules (default q_proj v_proj)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="collie-compile", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _models_command(sub)
    _gpus_command(sub)
    _estimate_command(sub)
    _plan_command(sub)
    _calibrate_command(sub)
    _train_command(sub)
    _check_command(sub)
    return p


def _models_command(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list the built-in model presets")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)


def _gpus_command(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gpus", help="list the GPU catalog")
    g.add_argument("name", nargs="?", help="print this GPU's spec as the JSON --gpu takes")
    g.add_argument("--json", action="store_true", help="the whole catalog as a JSON list")
    g.set_defaults(func=cmd_gpus)


def _update_arguments(parser: argparse.ArgumentParser, clipping: bool = True) -> None:
    """Where the optimizer updates, and the clipping that prices it (plan, train)."""
    parser.add_argument(
        "--update-in-backward", action=argparse.BooleanOptionalAction, default=None,
        help="lion, adamw, adam, adan: update each weight inside backward and free its "
             "gradient at once (default: the plan's choice; lomo/adalomo always do)")
    if clipping:
        parser.add_argument("--max-grad-norm", type=float, default=None,
                            help="clip the global gradient norm to this")
        parser.add_argument("--clip-mode", default="two-pass", choices=CLIP_MODES,
                            help="inside backward: measure the norm in a first backward "
                                 "(exact), or use the previous step's (one backward)")


def _estimate_command(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("estimate", help="per-GPU memory of one training layout (no GPU needed)")
    e.add_argument("model", help="preset name, or a directory/config.json of a HF causal LM")
    e.add_argument("--gpus", type=int, help="total GPUs (default dp*tp*pp)")
    e.add_argument("--gpu", default="a100-80gb", help="catalog name or JSON spec file")
    e.add_argument("--dp", type=int, help="data-parallel size (default gpus/(tp*pp))")
    e.add_argument("--tp", type=int, default=1)
    e.add_argument("--pp", type=int, default=1)
    e.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size: routed experts split over ep of the dp ranks")
    e.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    e.add_argument("--micro-batch", type=int, default=1)
    e.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per step (default: pp, so the pipeline fills)")
    e.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step, as plan takes it (sets --num-microbatches)")
    e.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default 2048, or the model's context if shorter)")
    e.add_argument("--recompute", default="none", choices=RECOMPUTE)
    e.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    e.add_argument("--virtual-stages", type=int, default=None,
                   help="model chunks per GPU of the interleaved schedule (default 2)")
    e.add_argument("--optimizer", default="adamw", type=str.lower,
                   help=f"one of {', '.join(OPTIMIZERS)}")
    e.add_argument("--dtype", default="bf16", type=str.lower,
                   help=f"one of {', '.join(DTYPE_NAMES)}")
    e.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank only (base weights frozen)")
    e.add_argument("--lora-targets", nargs="+", default=None, help=LORA_TARGETS_HELP)
    e.add_argument("--memory-reserve", type=float, default=0.05,
                   help="fraction of GPU memory kept free (default 0.05, as plan keeps)")
    _update_arguments(e, clipping=False)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_estimate)


def _plan_command(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("plan", help="find the fastest layout that fits (no GPU needed)")
    q.add_argument("model", help="preset name, or a directory/config.json of a HF causal LM")
    q.add_argument("--gpus", type=int, required=True)
    q.add_argument("--gpu", default="a100-80gb", help="catalog name or JSON spec file")
    q.add_argument("--gpus-per-node", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=None)
    q.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: ~2M tokens, rounded up to a "
                        "multiple of the GPU count)")
    q.add_argument("--optimizer", default="adamw", type=str.lower)
    q.add_argument("--dtype", default="bf16", type=str.lower)
    q.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank only (base weights frozen)")
    q.add_argument("--lora-targets", nargs="+", default=None, help=LORA_TARGETS_HELP)
    q.add_argument("--top", type=int, default=3, help="runners-up to show")
    q.add_argument("--memory-reserve", type=float, default=0.05,
                   help="fraction of GPU memory kept free (default 0.05)")
    q.add_argument("--expert-imbalance", type=float, default=EXPERT_IMBALANCE,
                   help="mixtures of experts: the busiest expert-parallel rank's rows over "
                        f"the mean, as priced (default {EXPERT_IMBALANCE}; 1: even routing)")
    Pins.add_arguments(q)
    _update_arguments(q)
    q.add_argument("--json", action="store_true")
    q.add_argument("--out", help="write the plan (JSON) here")
    q.set_defaults(func=cmd_plan)


def _calibrate_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="measure this machine into a hardware spec (JSON)")
    c.add_argument("--out", help="write the spec here")
    c.add_argument("--name", help="name for the spec (default: device name)")
    c.add_argument("--quick", action="store_true", help="small sizes: seconds, rougher")
    c.set_defaults(func=cmd_calibrate)


def _train_command(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train on text, JSONL or Parquet data (run under "
                                     "torchrun, one process per GPU; CPU processes use gloo)")
    t.add_argument("model", help="preset name, or a directory/config.json of a HF causal LM")
    t.add_argument("--data", required=True, nargs="+",
                   help="files or folders: .txt/.md (one document each), .jsonl, .parquet")
    t.add_argument("--text-field", default=None,
                   help="the records' text field (default: 'messages' chats, 'prompt'/"
                        "'completion', or 'text')")
    t.add_argument("--bad-records", choices=ON_ERROR, default="fatal",
                   help="a malformed record stops the run (fatal) or is left out (skip)")
    t.add_argument("--eval-data", nargs="+", default=None, help="held-out data files")
    t.add_argument("--eval-split", type=float, default=None,
                   help="hold this fraction of --data's documents out for evaluation")
    t.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: at the end, with eval data)")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    t.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up from lr/(N+1) to lr over the first N steps")
    t.add_argument("--decay-steps", type=int, default=None,
                   help="wsd: the final steps that decay (default: the last 10%%)")
    t.add_argument("--min-lr", type=float, default=0.0,
                   help="where linear, cosine and wsd decay to")
    t.add_argument("--output", default=None,
                   help="run folder: checkpoints, metrics.jsonl, tensorboard/, final/; "
                        "started again, the run resumes from its newest checkpoint")
    t.add_argument("--save-every", type=int, default=None,
                   help="write a checkpoint under --output every N steps (and at the end)")
    t.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest K checkpoints")
    t.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard logs under --output (default: when installed)")
    t.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the plan file's, or 64)")
    t.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: the plan file's, or 8)")
    t.add_argument("--optimizer", default=None, type=str.lower,
                   help="default: the plan file's, or adamw")
    t.add_argument("--dtype", default=None, type=str.lower,
                   help=f"weights' dtype, one of {', '.join(DTYPE_NAMES)} (default: the plan "
                        "file's, or fp32)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--plan", default="auto", help="'auto' or a plan JSON file")
    t.add_argument("--gpu", default=None,
                   help="hardware the auto plan assumes (default: this machine's GPU; "
                        "a100-80gb on a CPU)")
    t.add_argument("--tokenizer", help="local HF tokenizer directory (default: UTF-8 bytes)")
    t.add_argument("--weights", help="HF safetensors checkpoint to start from")
    t.add_argument("--save", help="write a HF checkpoint here at the end (--output writes "
                                  "one to OUTPUT/final too)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="launch this many workers on this node (torchrun's job, with one line "
                        "per error instead of its report); without it, run under torchrun or "
                        "as one process")
    t.add_argument("--separate-documents", action="store_true",
                   help="documents packed into a row attend only to themselves (position_ids "
                        "restarting per document, as DataCollatorWithFlattening's), not to "
                        "the ones before them")
    t.add_argument("--fresh-optimizer", action="store_true",
                   help="resuming --output under another optimizer: its states start afresh "
                        "(without it, such a resume is refused)")
    t.add_argument("--check", action="store_true",
                   help="afterwards, train one process the same way and compare the losses")
    t.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank only; --save writes a PEFT adapter")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale (default 2*rank)")
    t.add_argument("--lora-targets", nargs="+", default=None, help=LORA_TARGETS_HELP)
    t.add_argument("--peft", default=None, metavar="CONFIG.json",
                   help="train the adapters of a peft config (LoRA, DoRA, rsLoRA, IA3; a "
                        "JSON file of its peft_type and fields) only")
    t.add_argument("--peft-adapter", default=None, metavar="DIR",
                   help="continue training a saved PEFT adapter (save_pretrained's folder)")
    t.add_argument("--memory-reserve", type=float, default=None,
                   help="fraction of each GPU's memory the auto plan keeps free (default "
                        "0.05)")
    t.add_argument("--merge", action="store_true",
                   help="with adapters, --save plain HF weights with them folded in")
    Pins.add_arguments(t)
    _update_arguments(t)
    t.set_defaults(func=cmd_train)


def _check_command(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("check", help="train a small probe of the model under a layout on CPU "
                                     "processes and compare every weight with one process")
    k.add_argument("model", help="preset name, or a directory/config.json of a HF causal LM")
    Pins.add_arguments(k)
    k.add_argument("--lora", action="store_true", help="train LoRA adapters (all linears)")
    k.add_argument("--update-in-backward", action="store_true",
                   help="AdamW updates each weight inside backward (checked against one "
                        "process updating after it)")
    k.add_argument("--layers", type=int, default=2, help="decoder blocks of the probe")
    k.add_argument("--all-tensors", action="store_true", help="print every tensor's error")
    k.add_argument("--workdir", default=None, help="where checkpoints and results go "
                                                   "(default: a fresh temporary folder)")
    k.set_defaults(func=cmd_check)


def _quiet_libraries() -> None:
    """Keep the libraries' advice to their own users (deprecations, export and
    checkpointing notes) out of a command's output; our own warnings still show."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when it is imported
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category,
                                module=r"(torch|transformers|peft|pulp)(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc_per_node", None):
            if "RANK" in os.environ:
                raise CollieError("--nproc-per-node launches the workers itself; under "
                                  "torchrun leave it out")
            from collie_compile.launcher import launch_workers, without_nproc

            return launch_workers(args.nproc_per_node, without_nproc(argv))
        return args.func(args)
    except CollieError as e:
        rank = int(os.environ.get("RANK", "0"))  # under torchrun
        if rank and e.shared:
            return e.exit_code  # rank 0 reports what every rank agreed on
        where = f"rank {rank}: " if rank else ""
        print(f"collie-compile: error: {where}{e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
