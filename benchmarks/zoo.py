"""The conformance matrix: every family in transformers' causal-LM auto mapping, built from
a tiny probe of its default config, through capture, estimate, one process and each
parallel layout against one process (every saved tensor compared, see
:mod:`collie_compile.runtime.check`).

Resumable: results go to ``zoo.jsonl`` in the output folder as they come, one torchrun
launch per layout runs every family, and a rerun skips what is there. ``--families``
limits the run. Columns: ✓ passes, ✗ disagrees with one process or crashes (a bug),
refused (with the reason), — not run (a kind collie-compile does not target, or an
earlier column failed).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from collie_compile.errors import CollieError, first_line
from collie_compile.runtime.check import (
    EP_LAYOUTS,
    LAYOUTS,
    Case,
    Result,
    read_results,
    run_cases,
)

COLUMNS = ["capture", "estimate", *LAYOUTS, *EP_LAYOUTS]  # ep columns: MoE families
TARGET_KINDS = ("decoder", "moe")  # dense decoder-only transformers, and MoE ones


def _front(model_type: str, cfg: object) -> dict[str, Result]:
    """Capture and estimate, in this process: the profile's parameter count must equal
    the real transformers model's."""
    from transformers import AutoModelForCausalLM

    from collie_compile.cost.profile import profile_model
    from collie_compile.models.registry import count_params

    out: dict[str, Result] = {}
    try:
        prof = profile_model(cfg, seq_len=16, dtype="fp32")
    except CollieError as e:
        out["capture"] = Result("capture", "refused", str(e))
        return out
    except Exception as e:  # a bug in capture or annotation
        out["capture"] = Result("capture", "crash", first_line(e))
        return out
    out["capture"] = Result("capture", "pass")
    import torch

    with torch.device("meta"):
        real = count_params(AutoModelForCausalLM.from_config(cfg))
    ok = prof.num_params == real
    out["estimate"] = Result("estimate", "pass" if ok else "fail", "" if ok else
                             f"profile counts {prof.num_params:,} parameters, the model has "
                             f"{real:,}")
    return out


def main(out: str | None = None, families: list[str] | None = None,
         layouts: bool = True) -> None:
    """Run the suite for ``families`` (default: the whole mapping); ``layouts=False`` runs
    capture and estimate only. The matrix covers every family recorded so far."""
    from transformers import AutoConfig

    from collie_compile.models.probe import causal_lm_families, family_kind, probe_config

    folder = Path(out or "benchmarks/results/cpu-2core/zoo")
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "zoo.jsonl"
    work = Path(tempfile.mkdtemp(prefix="collie-zoo-"))  # checkpoints: scratch only
    rows: dict[str, dict[str, Result]] = {}
    kinds: dict[str, str] = {}
    fronts = folder / "front.jsonl"
    done = {json.loads(ln)["family"]: json.loads(ln) for ln in
            (fronts.read_text().splitlines() if fronts.exists() else []) if ln.strip()}
    cases = []
    for t in families or causal_lm_families():
        if t not in done:
            try:
                kind = family_kind(t)
                cfg = probe_config(AutoConfig.for_model(t), heads=4, kv_heads=2,
                                   no_dropout=True)
                front = _front(t, cfg) if kind in TARGET_KINDS else {}
                entry = {"family": t, "kind": kind, "config": cfg.to_dict(),
                         "front": {k: r.__dict__ for k, r in front.items()},
                         "versions": _versions()}
            except Exception as e:  # the probe itself does not build
                entry = {"family": t, "kind": "other", "config": None, "front": {
                    "capture": Result("capture", "crash", f"probe: {first_line(e)}").__dict__}}
            with open(fronts, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
            done[t] = entry
            print(f"{t}: {entry['kind']}, " + ", ".join(
                f"{k} {v['status']}" for k, v in entry["front"].items()), flush=True)
        entry = done[t]
        if entry["front"].get("capture", {}).get("status") == "pass":
            extra = EP_LAYOUTS if entry["kind"] == "moe" else {}
            cases += [Case(f"{t}/{name}", entry["config"], layout)
                      for name, layout in {**LAYOUTS, **extra}.items()]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if layouts:
        run_cases(cases, store, work, timeout=4 * 3600)
    for t, entry in done.items():  # the matrix: every family recorded so far
        kinds[t] = entry["kind"]
        rows[t] = {k: Result.from_dict(v) for k, v in entry["front"].items()}
    for r in read_results(store):
        family, _, column = r.id.partition("/")
        if family in rows:
            rows[family][column] = r
    ran_on = Counter(_ran_on(entry) for entry in done.values())
    (folder / "zoo.md").write_text(matrix(rows, kinds, ran_on))
    print(f"wrote {folder / 'zoo.md'}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"torch": version("torch"), "transformers": version("transformers")}


def _ran_on(entry: dict) -> str:
    """The library versions an entry was run with (entries written before they were
    recorded carry transformers' version in the probe's config)."""
    v = entry.get("versions") or {
        "transformers": (entry.get("config") or {}).get("transformers_version", "unknown")}
    return ", ".join(f"{k} {v[k]}" for k in ("transformers", "torch") if k in v)


def matrix(rows: dict[str, dict[str, Result]], kinds: dict[str, str],
           ran_on: Counter) -> str:
    """The markdown matrix, a count per column and every refusal's reason, headed by the
    library versions the families ran on (``ran_on``: versions -> families)."""
    mark = {"pass": "✓", "fail": "✗", "crash": "✗", "refused": "refused"}
    lines = ["| family | kind | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    notes = []
    for t in sorted(rows):
        cells = []
        for c in COLUMNS:
            r = rows[t].get(c)
            cells.append(mark[r.status] if r else "—")
            if r and r.status != "pass":
                notes.append(f"- {t} / {c}: {r.status}: {r.reason}")
        lines.append(f"| {t} | {kinds[t]} | " + " | ".join(cells) + " |")
    totals = {c: sum(1 for t in rows if rows[t].get(c) and rows[t][c].status == "pass")
              for c in COLUMNS}
    target = sum(1 for t in rows if kinds[t] in TARGET_KINDS)
    head = [f"{len(rows)} families, {target} of them dense or MoE decoder-only (the target). "
            "Passing per column: " + ", ".join(f"{c} {n}" for c, n in totals.items()), "",
            "Ran on " + "; ".join(f"{v} ({n} families)" for v, n in ran_on.most_common()), ""]
    return "\n".join(head + lines + ["", "Not passing, with the reason:", *notes]) + "\n"
