"""Optimizers side by side on one model, and the fused kernels' bandwidth (GPU).

The same model, data and batch trained by AdamW, Lion, LOMO and AdaLomo in one process,
AdamW and Lion both after backward and inside it (``update_in_backward``): peak memory
per step and the median step time, on the GPU where CUDA is present (peak by
``max_memory_allocated``), else on the CPU (peak by MemTracker, which also splits it by
category). Batch 1 with full recomputation (the LOMO paper's setting), so that model
states dominate.

With CUDA, also each update kernel's achieved bandwidth, bytes it must move divided by
its time, against the card's measured device-to-device copy.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from collie_compile.cost.measure import make_optimizer, measure_peak
from collie_compile.models.registry import build_model, load_config, with_layers
from collie_compile.recompute_policy import enable_on_hf_model

from .report import Report, table

# small-llama's blocks, 24 of them (44M parameters): a body-heavy model, as real LLMs are,
# where the embedding's gradient (the largest LOMO ever holds) is a small part.
MODEL, LAYERS, BATCH, SEQ, STEPS, RECOMPUTE = "small-llama", 24, 1, 64, 5, "full"
# (optimizer, updated inside backward)
OPTIMIZERS = [("adamw", False), ("adamw", True), ("lion", False), ("lion", True),
              ("lomo", True), ("adalomo", True)]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def step_time(optimizer: str, inside: bool, steps: int = STEPS) -> float:
    """Median seconds of forward + backward + update (fused or not) after one warm-up."""
    torch.manual_seed(0)
    cfg = config()
    model = build_model(cfg, device="cpu").to(device())
    model.train()
    enable_on_hf_model(model, RECOMPUTE)
    opt = make_optimizer(optimizer, list(model.parameters()), update_in_backward=inside)
    ids = torch.randint(0, int(cfg.vocab_size), (BATCH, SEQ), device=device())
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def config() -> object:
    return with_layers(load_config(MODEL), LAYERS)


def optimizer_rows() -> list[dict]:
    rows = []
    for opt, inside in tqdm(OPTIMIZERS, desc="optimizers", leave=False):
        peak = measure_peak(config(), opt, RECOMPUTE, "fp32", BATCH, SEQ, device=device(),
                            update_in_backward=inside and opt in ("adamw", "lion"))
        rows.append(dict(optimizer=opt + (" in backward" if inside and opt in ("adamw", "lion")
                                          else ""), rule=opt, inside=inside,
                         peak=peak.total_bytes, by=peak.by_category,
                         seconds=step_time(opt, inside)))
    return rows


def saved_rows(rows: list[dict], grad_bytes: int) -> list[list[str]]:
    """Each rule's peak inside backward against its own after backward, in gradient bytes:
    the goal is a saving of at least 90% of them."""
    out = []
    for r in rows:
        after = next((a for a in rows if a["rule"] == r["rule"] and not a["inside"]), None)
        if r["inside"] and after is not None:
            saved = after["peak"] - r["peak"]
            out.append([r["optimizer"], f"{after['peak'] / 2**20:.1f}",
                        f"{r['peak'] / 2**20:.1f}", f"{saved / 2**20:.1f}",
                        f"{grad_bytes / 2**20:.1f}", f"{100 * saved / grad_bytes:.0f}%"])
    return out


def _cases(n: int, dtype: torch.dtype) -> list[tuple[str, int, object]]:
    """(kernel, bytes it must move per element, call) on ``n`` CUDA elements."""
    from collie_compile.kernels.adalomo import adalomo_state, adalomo_update_triton
    from collie_compile.kernels.adamw import adamw_update_triton
    from collie_compile.kernels.adan import adan_update_triton
    from collie_compile.kernels.lion import lion_update_triton
    from collie_compile.kernels.lomo import lomo_update_triton

    p = torch.randn(n, device="cuda").to(dtype)
    g = torch.randn(n, device="cuda").to(dtype)
    m = torch.zeros(n, device="cuda")
    e = p.element_size()
    mat_p, mat_g = p.view(8192, -1), g.view(8192, -1)
    state = adalomo_state(mat_p)
    v = torch.zeros(n, device="cuda")
    adan = {"step": 2, **{k: torch.zeros(n, device="cuda") for k in ("m", "v", "n", "prev_grad")}}
    return [("lomo", 3 * e, lambda: lomo_update_triton(p, g, 1e-6)),  # read p, g; write p
            ("lion", 3 * e + 8, lambda: lion_update_triton(p, g, m, 1e-6)),  # + m in, out
            ("adamw", 3 * e + 16,  # + m, v in and out
             lambda: adamw_update_triton(p, g, m, v, 1e-6, 0.9, 0.999, 1e-8, 0.0, 2)),
            ("adan", 3 * e + 32,  # + m, v, n, previous gradient in and out
             lambda: adan_update_triton(p, g, adan, 1e-6, (0.98, 0.92, 0.99), 1e-8, 0.0)),
            # three passes read G, two read p, one writes p
            ("adalomo", 6 * e, lambda: adalomo_update_triton(mat_p, mat_g, state, 1e-6))]


def gpu_rows(n: int = 1 << 26) -> list[list[object]]:
    """Achieved GB/s of each kernel on ``n`` elements against a plain copy."""
    def timed(fn, reps: int = 20) -> float:
        fn()  # compile and autotune
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.nbytes / timed(lambda: dst.copy_(src)) / 1e9
    rows = [["copy (fp32)", f"{copy_gbs:.0f}", "100%"]]
    for dtype in (torch.float32, torch.bfloat16):
        for name, bytes_per, fn in _cases(n, dtype):
            gbs = bytes_per * n / timed(fn) / 1e9
            rows.append([f"{name} ({str(dtype).removeprefix('torch.')})", f"{gbs:.0f}",
                         f"{100 * gbs / copy_gbs:.0f}%"])
    return rows


def _mib(by: dict[str, int], category: str) -> str:
    return f"{by.get(category, 0) / 2**20:.1f}" if by else "-"


def main(out: str | None = None) -> None:
    rep = Report("kernels", out)
    rows = optimizer_rows()
    base = next(r for r in rows if r["optimizer"] == "adamw")
    params = sum(p.numel() for p in build_model(config()).parameters())
    where = (f"on {torch.cuda.get_device_name()} (peak: max_memory_allocated; no split by "
             "category)" if device() == "cuda" else "on the CPU (peak: MemTracker)")
    rep.add(f"{MODEL} with {LAYERS} blocks ({params / 1e6:.1f}M parameters), fp32, batch "
            f"{BATCH} x {SEQ}, {RECOMPUTE} recomputation, one process {where}\n\n" + table(
                ["optimizer", "peak MiB", "x AdamW", "grads MiB", "states MiB", "step s",
                 "x AdamW"],
                [[r["optimizer"], f"{r['peak'] / 2**20:.1f}", f"{r['peak'] / base['peak']:.2f}",
                  _mib(r["by"], "grad"), _mib(r["by"], "opt"), f"{r['seconds']:.3f}",
                  f"{r['seconds'] / base['seconds']:.2f}"] for r in rows],
                right=range(1, 7)))
    rep.add("Updating inside backward against the same rule after it: the peak saved, in "
            "MiB and as a share of the gradients' bytes (goal: 90% or more)\n\n" + table(
                ["rule", "after MiB", "inside MiB", "saved MiB", "grads MiB", "saved/grads"],
                saved_rows(rows, 4 * params), right=range(1, 6)))
    rep.plot("kernels_memory", lambda ax: (
        ax.bar([r["optimizer"] for r in rows], [r["peak"] / 2**20 for r in rows]),
        ax.set_ylabel("peak MiB"),
        ax.set_title(f"{MODEL} x{LAYERS} blocks, fp32, batch {BATCH}x{SEQ}, {device()}")))
    if torch.cuda.is_available():
        rep.add(f"fused update kernels on {torch.cuda.get_device_name()}, 2^26 elements\n\n"
                + table(["kernel", "GB/s", "of copy"], gpu_rows(), right=(1, 2)))
    else:
        rep.add("No CUDA device here: the kernels' bandwidth part did not run.")
    rep.save()
