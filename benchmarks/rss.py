"""Host memory of ``parallelize(gpus=1)`` as a new user meets it: process peak RSS per
optimizer, in phases, beside the tensors alive at the peak.

Each optimizer runs in a fresh process (RSS never shrinks back to what a previous run
left). Phases, as RSS above the RSS once imports and the process group are up: the model
built, ``parallelize`` done, the peak over the training steps (the kernel's high-water
mark, reset at the baseline through ``/proc/self/clear_refs``). Each run twice: cold, as
a user's first call, and warm, after a ``parallelize`` of tiny-llama in the same process
has paid the one-time cost of torch.export's lazily imported machinery. Beside them, the
peak of live tensor bytes in the steps (:class:`~collie_compile.cost.measure.LiveBytes`,
told of the weights) and the three terms LOMO's promise is made of: weights, the largest
gradient, the batch's activations (what a forward with autograd keeps, logits included).
Linux only (``/proc``).

The last table answers how much of the gradients' memory updating inside backward saves,
by both measures. Inside backward a step still holds, beyond weights and states, the
activations of the whole forward when the first (largest: the LM head's) gradient arrives,
and that gradient; so the tensor-level saving is the gradients less those, not all of
them. Each pair runs once more with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps
every block of 64 KiB or more on its own and unmaps it when freed, where by default the
threshold rises to the largest block freed (12 MiB here) and freed blocks below it stay
resident in the heap. What RSS holds beyond the tensors then is the allocator's slack and
``parallelize``'s own objects (graphs, code), its "parallelized" column less "built".
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from collie_compile.optim.in_backward import STATE_KEYS

from .report import Report, table

MODEL, LAYERS, BATCH, SEQ, STEPS = "small-llama", 17, 2, 32, 3
# (optimizer, updated inside backward)
RUNS = [("adamw", False), ("adamw", True), ("lion", False), ("lion", True), ("lomo", True),
        ("adalomo", True)]
MiB = 2**20


def _rss(field: str = "VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS


def measure(optimizer: str, inside: bool, warm: bool) -> dict:
    """One run in this process: the phases and the tensor-level peak (bytes)."""
    import torch
    import torch.distributed as dist

    from collie_compile.cost.measure import LiveBytes
    from collie_compile.models.registry import build_model, load_config, with_layers
    from collie_compile.runtime.parallel_model import parallelize

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29577", rank=0,
                            world_size=1)
    if warm:  # torch.export's machinery imported and used once, then dropped
        tiny = parallelize(build_model(load_config("tiny-llama"), device="cpu"), gpus=1,
                           seq_len=16, global_batch_size=2, optimizer=optimizer)
        tiny.train_step({"input_ids": torch.zeros(2, 16, dtype=torch.long)})
        del tiny
        gc.collect()
    cfg = with_layers(load_config(MODEL), LAYERS)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, int(cfg.vocab_size), (BATCH, SEQ), generator=g)
            for _ in range(STEPS)]
    base = _rss()
    _reset_peak()
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    built = _rss()
    kw = {"update_in_backward": True} if optimizer in ("adamw", "lion") and inside else {}
    pm = parallelize(model, gpus=1, seq_len=SEQ, global_batch_size=BATCH,
                     optimizer=optimizer, **kw)
    ready = _rss()
    live = LiveBytes()
    live.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    with live:
        for ids in data:
            pm.train_step({"input_ids": ids})
    peak = _rss("VmHWM")
    acts = LiveBytes()
    acts.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    with acts:
        logits = pm.stages[0](data[0])  # one stage: the whole model, autograd recording
    del logits
    dist.destroy_process_group()
    return {"optimizer": optimizer + (" in backward" if kw else ""), "warm": warm,
            "built": built - base,
            "parallelized": ready - base, "peak": peak - base, "tensor_peak": live.peak,
            "weights": weights, "largest_grad": largest,
            "activations": acts.peak - weights}


MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(opt: str, inside: bool, warm: bool, env: dict | None = None) -> dict:
    """One measurement in a fresh process (``env`` added to this one's)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rss", opt, str(inside), str(warm)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows() -> list[dict]:
    return [run(opt, inside, warm) for warm in (False, True) for opt, inside in RUNS]


def saved_rows(warm_rows: list[dict]) -> list[list[str]]:
    """For AdamW and Lion: what updating inside backward saves, tensor-level and in RSS
    (default allocator and mmap threshold fixed), against the gradients' bytes."""
    out = []
    for opt in ("adamw", "lion"):
        after, inside = (next(r for r in warm_rows if r["optimizer"] == name)
                         for name in (opt, opt + " in backward"))
        mm_after, mm_inside = run(opt, False, True, MMAP), run(opt, True, True, MMAP)
        grads = after["weights"]
        states = len(STATE_KEYS[opt]) * grads  # fp32, shaped as the weights
        floor = grads + states + inside["activations"] + inside["largest_grad"]
        out.append([opt, f"{grads / MiB:.1f}", f"{inside['tensor_peak'] / MiB:.1f}",
                    f"{floor / MiB:.1f}",
                    *(f"{(a - b) / MiB:.1f} ({100 * (a - b) / grads:.0f}%)" for a, b in (
                        (after["tensor_peak"], inside["tensor_peak"]),
                        (after["peak"], inside["peak"]),
                        (mm_after["peak"], mm_inside["peak"]))),
                    f"{(mm_inside['peak'] - inside['tensor_peak']) / MiB:.1f}"])
    return out


def main(out: str | None = None) -> None:
    rep = Report("rss", out)
    rs = rows()
    w = rs[0]["weights"]
    for warm in (False, True):
        part = [r for r in rs if r["warm"] == warm]
        adamw = next(r for r in part if r["optimizer"] == "adamw")
        rep.add(f"{'Warm (after a tiny-llama parallelize)' if warm else 'Cold (first call)'}: "
                f"{MODEL} with {LAYERS} blocks ({w / 4 / 1e6:.1f}M parameters, {w / MiB:.1f} "
                f"MiB fp32 weights), batch {BATCH} x {SEQ}, {STEPS} steps through "
                "parallelize(gpus=1) on the CPU; MiB above the RSS before the model was "
                "built\n\n" + table(
                    ["optimizer", "built", "parallelized", "peak RSS", "x AdamW",
                     "tensor peak"],
                    [[r["optimizer"], f"{r['built'] / MiB:.1f}",
                      f"{r['parallelized'] / MiB:.1f}", f"{r['peak'] / MiB:.1f}",
                      f"{r['peak'] / adamw['peak']:.2f}", f"{r['tensor_peak'] / MiB:.1f}"]
                     for r in part], right=range(1, 6)))
    rep.add("Updating inside backward against the same rule after it, warm, MiB: the "
            "gradients; the tensor peak inside backward beside its floor (weights, states, "
            "the activations when the first, largest gradient arrives, and that gradient); "
            "the peak saved, tensor-level and in RSS, by default and with "
            "MALLOC_MMAP_THRESHOLD_=65536; last, RSS above the tensor peak inside backward "
            "with that threshold (parallelize's graphs and objects, the allocator's slack)"
            "\n\n" + table(
                ["rule", "gradients", "inside: tensor peak", "its floor", "tensor saved",
                 "RSS saved", "RSS saved (mmap 64K)", "RSS over tensors (mmap 64K)"],
                saved_rows([r for r in rs if r["warm"]]), right=range(1, 8)))
    lomo = next(r for r in rs if r["optimizer"] == "lomo")
    floor = lomo["weights"] + lomo["largest_grad"] + lomo["activations"]
    rep.add(f"LOMO's tensor-level peak {lomo['tensor_peak'] / MiB:.1f} MiB against weights "
            f"{lomo['weights'] / MiB:.1f} + largest gradient {lomo['largest_grad'] / MiB:.1f} "
            f"+ activations {lomo['activations'] / MiB:.1f} = {floor / MiB:.1f} MiB "
            f"({100 * (lomo['tensor_peak'] / floor - 1):+.0f}%)")
    rep.save()


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2] == "True", sys.argv[3] == "True")))
