"""CoLLiE's memory study, from our cost model and planner: GPU memory against model size
for every optimizer and PEFT method, and the fewest GPUs each needs.

CoLLiE's protocol (its paper, section 4.1): LLaMA 3B/7B/13B/30B/65B, bf16, batch 1 with
gradient accumulation 2, sequence 2048, activation recomputation, flash attention, tensor
parallelism. Here every point is the planner's: for each model, method and GPU the
fewest GPUs N (of :data:`COUNTS`) for which it finds a plan that fits, with 2 sequences
of 2048 tokens per GPU and step (a global batch of 2N: batch 1 and 2 accumulation steps
where dp = N), full recomputation pinned, the rest (dp, tp, pp, ZeRO, where the update
runs) its choice. A fixed global batch of 2 would cap every plan at 16 GPUs (dp ≤ 2,
pp ≤ 2 micro-batches, tp ≤ 8 in a node). Prompt methods (20 virtual tokens) read
sequences of 2028 tokens, so that the model runs LLaMA's 2048 positions. "GB per
billion parameters" is that plan's memory summed over its GPUs (the busiest GPU's
estimate times the count, an upper bound) over the parameters.

No GPU is used: these are estimates, held to ±5% of measured peaks by the
``estimate`` and ``fidelity`` suites.
"""

from __future__ import annotations

import time

from collie_compile.errors import CollieError
from collie_compile.models.prompts import virtual_tokens
from collie_compile.models.registry import build_model, load_config
from collie_compile.planner.search import plan
from collie_compile.runtime.options import (
    check_peft,
    lora_plan_args,
    with_peft_defaults,
)

from .report import Report, table

MODELS = {"open-llama-3b": "3B", "llama-7b": "7B", "llama-13b": "13B", "llama-30b": "30B",
          "llama-65b": "65B"}
GPUS = ("a100-80gb", "a100-40gb", "rtx3090")
COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
SEQ, PER_GPU = 2048, 2
GiB = 2**30

# CoLLiE's measured fits (total GB across GPUs per billion parameters) and its table of
# the fewest A100s (7B/13B/30B/65B); its 80 GB and 40 GB parts are not told apart there
COLLIE_FIT = {"Adan": 34.5, "Sophia": 34.5, "AdamW": 30.5, "Lion": 30.5, "LOMO": 2.1,
              "LoRA": 2.1}
COLLIE_MIN_A100 = {"AdamW": (2, 3, 6, 16), "LoRA": (1, 1, 1, 2), "LOMO": (1, 1, 1, 2)}


def _peft(kind: str, **fields: object) -> object:
    import peft

    return getattr(peft, kind)(**fields)


# name -> (optimizer, update inside backward, peft config factory or None)
METHODS: dict[str, tuple[str, bool | None, object]] = {
    "AdamW": ("adamw", False, None),
    "AdamW inside backward": ("adamw", True, None),
    "Lion": ("lion", False, None),
    "Lion inside backward": ("lion", True, None),
    "Adan": ("adan", False, None),
    "Sophia": ("sophia", None, None),
    "LOMO": ("lomo", None, None),
    "AdaLomo": ("adalomo", None, None),
    "LoRA": ("adamw", None, lambda: _peft("LoraConfig", r=8, lora_alpha=16)),
    "DoRA": ("adamw", None, lambda: _peft("LoraConfig", r=8, lora_alpha=16, use_dora=True)),
    "IA3": ("adamw", None, lambda: _peft("IA3Config")),
    "Prompt tuning": ("adamw", None, lambda: _peft(
        "PromptTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "P-tuning": ("adamw", None, lambda: _peft(
        "PromptEncoderConfig", task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "Prefix tuning": ("adamw", None, lambda: _peft(
        "PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "AdaLoRA": ("adamw", None, lambda: _peft("AdaLoraConfig", total_step=1000)),
}


def _plan_args(method: str, model: str) -> dict:
    """The planner's arguments for ``method`` (a refusal raises CollieError)."""
    optimizer, inside, make = METHODS[method]
    args: dict = {"optimizer": optimizer}
    if inside is not None:
        args["update_in_backward"] = inside
    if make is not None:
        config = with_peft_defaults(check_peft(make(), fresh=True),
                                    build_model(load_config(model)))
        rank, targets = lora_plan_args(config)
        args.update(lora_rank=rank, lora_targets=targets,
                    virtual_tokens=virtual_tokens(config),
                    lora_dora=bool(getattr(config, "use_dora", False)))
    return args


def fewest(model: str, gpu: str, args: dict) -> tuple[int, object] | None:
    """The fewest GPUs of :data:`COUNTS` with a plan that fits, and that plan (a binary
    search: more GPUs never hold more per GPU here), or None past the last count."""
    def solve(n: int) -> object:
        try:
            # prompt methods: the model runs SEQ positions, virtual tokens included
            seq = SEQ - args.get("virtual_tokens", 0)
            return plan(model, gpus=n, gpu=gpu, seq_len=seq, global_batch_size=PER_GPU * n,
                        dtype="bf16", recompute="full", quick=True, top_k=0, **args)
        except CollieError:  # no layout of n GPUs runs this model (tp vs heads, ...)
            return None

    lo, hi, best = 0, len(COUNTS) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = solve(COUNTS[mid])
        if p is not None and p.feasible:
            best, hi = (COUNTS[mid], p), mid - 1
        else:
            lo = mid + 1
    return best


def _reading(fits: dict, minimum: dict) -> str:
    """What the tables say beside CoLLiE's, from their numbers."""
    def a100(method: str) -> str:
        return "/".join(str(minimum[(method, s)][0]) for s in ("7B", "13B", "30B", "65B"))

    adam = fits["AdamW"][0]
    p30 = fits["AdamW"][1][3][0]  # billions of parameters of the 30B model
    return (
        "## Reading the tables\n\n"
        f"- Full fine-tuning with AdamW: {adam:.1f} GB per billion parameters against "
        "CoLLiE's 30.5. Summed over the GPUs, mixed-precision Adam needs its 16 bytes a "
        "parameter (bf16 weight and gradient, fp32 master, m and v), and with full "
        "recomputation little more: the rest is activations and the logits. CoLLiE's "
        "figure is measured and holds what an estimate of tensors leaves out (the "
        "allocator's cached and fragmented blocks, communication buffers, framework "
        "workspaces: the planner keeps 5% of each GPU for them).\n"
        f"- The fewest A100-80GB for AdamW (7B/13B/30B/65B): {a100('AdamW')} against "
        f"CoLLiE's 2/3/6/16. At 30B ({p30:.1f}B parameters) the 16 bytes a parameter "
        f"alone are {16 * p30:.0f} GB against the 480 GB of six 80 GB cards, so CoLLiE's "
        "six must have kept fewer bytes a parameter (no fp32 master, or states "
        "offloaded); our count is what mixed-precision AdamW needs.\n"
        f"- Lion ({fits['Lion'][0]:.1f} GB/B) keeps one moment where Adam keeps two, so it "
        f"needs fewer GPUs ({a100('Lion')}); CoLLiE groups Lion with Adam at 30.5. Updating "
        "inside backward frees the gradients: Lion then fits 7B on "
        f"{a100('Lion inside backward').split('/')[0]} A100.\n"
        f"- LOMO ({fits['LOMO'][0]:.1f}) and LoRA ({fits['LoRA'][0]:.1f}) agree with "
        f"CoLLiE's 2.1, and so does the count of GPUs: LOMO {a100('LOMO')}, LoRA "
        f"{a100('LoRA')} (CoLLiE: 1/1/1/2 for both). DoRA, IA3 and the prompt methods "
        "need the same: a frozen base in bf16 (2 bytes a parameter) dominates them all.\n"
    )


# The small-scale check: these methods measured in one process against their estimate
VALIDATION = ("AdamW", "Lion inside backward", "LOMO", "LoRA", "DoRA", "AdaLoRA", "IA3",
              "Prompt tuning", "P-tuning", "Prefix tuning")
SMALL, SMALL_SEQ, SMALL_BATCH = "small-llama", 256, 2


def measured_small(method: str) -> tuple[int, int, str]:
    """(estimated, measured peak bytes, layout) of ``method`` training small-llama (fp32)
    in this process: ``parallelize``'s plan, then two steps under ``LiveBytes`` (every
    storage alive, the weights made before it included), as the ``estimate`` suite
    measures parallel plans."""
    import torch

    from collie_compile.cost.measure import LiveBytes
    from collie_compile.runtime.parallel_model import parallelize

    optimizer, inside, make = METHODS[method]
    torch.manual_seed(0)
    model = build_model(load_config(SMALL), device="cpu")
    pm = parallelize(model, seq_len=SMALL_SEQ, global_batch_size=SMALL_BATCH,
                     optimizer=optimizer, dp=1, tp=1, pp=1, recompute="none",
                     peft=make() if make else None, update_in_backward=inside,
                     dtype="fp32")
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, int(model.config.vocab_size), (SMALL_BATCH, SMALL_SEQ),
                          generator=gen) for _ in range(2)]
    live = LiveBytes()
    live.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    with live:
        for ids in data:
            pm.train_step({"input_ids": ids})
    return pm.chosen.memory_per_gpu_bytes, live.peak, pm.chosen.layout_str()


def main(out: str | None = None) -> None:
    start = time.perf_counter()
    rep = Report("study-memory", out)
    rep.add(__doc__.split("\n\n", 1)[1].strip())
    rows, fits, minimum, refused = [], {}, {}, {}
    for method in METHODS:
        per_b = []
        for model, size in MODELS.items():
            try:
                args = _plan_args(method, model)
            except CollieError as e:
                refused[method] = str(e)
                break
            counts = []
            for gpu in GPUS:
                found = fewest(model, gpu, args)
                counts.append(found[0] if found else None)
                if gpu == GPUS[0] and found:
                    n, p = found
                    total = p.chosen.memory_per_gpu_bytes * n / 1e9
                    params = p.num_params / 1e9
                    per_b.append((params, total))
                    rows.append([method, size, n, p.chosen.layout_str().split(" recompute")[0],
                                 f"{p.chosen.memory_per_gpu_bytes / GiB:.1f}",
                                 f"{total / params:.1f}"])
            minimum[(method, size)] = counts
        if per_b:  # least squares through the origin: GB per billion parameters
            fits[method] = (sum(p * t for p, t in per_b) / sum(p * p for p, _ in per_b), per_b)
    rep.add("## Memory per model, on the fewest A100-80GB that fit\n\n"
            + table(["method", "model", "A100-80GB", "plan", "GiB per GPU",
                     "total GB per B params"], rows, right=(2, 4, 5)))
    rep.add("## GB per billion parameters (fit over 3B-65B) beside CoLLiE's\n\n" + table(
        ["method", "ours", "CoLLiE"],
        [[m, f"{f[0]:.1f}", COLLIE_FIT.get(m.split(" ")[0], "")] for m, f in fits.items()],
        right=(1, 2)))
    sizes = list(MODELS.values())
    rep.add("## The fewest GPUs (A100-80GB / A100-40GB / RTX 3090) beside CoLLiE's A100s\n\n"
            + table(["method", *sizes, "CoLLiE A100s (7B/13B/30B/65B)"],
                    [[m, *["/".join(str(c or ">128") for c in minimum[(m, s)])
                           for s in sizes],
                      "/".join(map(str, COLLIE_MIN_A100.get(m, ())))]
                     for m in METHODS if m not in refused], right=tuple(range(1, 6))))
    rep.add(_reading(fits, minimum))
    checks = []
    for method in VALIDATION:
        est, got, _ = measured_small(method)
        checks.append([method, f"{est / 2**20:.1f}", f"{got / 2**20:.1f}",
                       f"{(est - got) / got:+.1%}"])
    rep.add(f"## Checked at small scale: {SMALL} (fp32, batch {SMALL_BATCH} x {SMALL_SEQ}, "
            "one process, no recomputation), the planner's estimate against the peak of "
            "two training steps (every tensor alive, as the `estimate` suite measures)\n\n"
            + table(["method", "estimated MiB", "measured MiB", "estimate - measured"],
                    checks, right=(1, 2, 3)))
    if refused:
        rep.add("## Refused, with the reason\n\n" + "\n".join(
            f"- {m}: {why}" for m, why in refused.items()))

    def draw(ax: object) -> None:
        import matplotlib

        colors = matplotlib.colormaps["tab20"].colors
        for k, (m, (slope, pts)) in enumerate(fits.items()):
            xs, ys = [p for p, _ in pts], [t for _, t in pts]
            ax.plot(xs, ys, marker="o", markersize=3, color=colors[k % len(colors)],
                    label=f"{m} ({slope:.1f} GB/B)")
        for m, who in (("AdamW", "Adam/Lion"), ("Adan", "Adan/Sophia"),
                       ("LoRA", "LOMO/LoRA")):  # CoLLiE's fits, over the same sizes
            xs = [p for p, _ in fits[m][1]]
            ax.plot(xs, [COLLIE_FIT[m] * x for x in xs], linestyle=":", color="black")
            ax.annotate(f"CoLLiE {who} {COLLIE_FIT[m]} GB/B",
                        (xs[-1], COLLIE_FIT[m] * xs[-1]), fontsize=5, ha="right",
                        va="bottom")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("GB summed over the GPUs")
        ax.set_title("Estimated training memory (dotted: CoLLiE's measured fits)")
        ax.set_yscale("log")
        ax.legend(fontsize=5, ncol=2)

    rep.plot("study-memory", draw)
    rep.add(f"Solved in {time.perf_counter() - start:.0f} s.")
    rep.save()
