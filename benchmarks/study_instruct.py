"""CoLLiE's third study: optimizers × PEFT methods on instruction tuning, scored by
exact-match generation and held-out loss.

The harness takes any base model and instruction data (JSON Lines prompt/completion
records, as ``train`` reads them, tokenized with the model's tokenizer where its folder
has one, else as UTF-8 bytes) and fine-tunes it once per optimizer × method and
seed, every run the same budget: the same steps over the same batches (one example per
row, right-padded, the loss on the completion only). Each saved model (a PEFT adapter,
or plain weights for full fine-tuning) is scored with transformers on held-out records:
greedy ``generate`` from the prompt, exact match of the completion, and the mean
completion loss.

At CPU scale (the default) the base is a 2-block Llama trained here by ``train`` on a
generated task family written plainly ("3+4=7", "rev abc=cba", "k:b a=x b=y c=z=y"), and
the instructions ask the same questions as a chat turn ("User: 3+4?\\nAssistant: 7"):
tuning has to carry known skills over to a new format, on instances it never saw in
that format.
``--data`` / ``--model`` run the same on real data and weights (on a GPU machine).
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from collie_compile.errors import CollieError

from .report import Report, table

OPTIMIZERS = ("adamw", "lion", "lomo", "adalomo")
METHODS = {  # method -> peft config fields (None: the whole model trains)
    "full": None,
    "LoRA": {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj"]},
    "DoRA": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj"]},
    # ranks 12 -> 8 per adapter, cut between steps 25 and 200 (total_step: the run's)
    "AdaLoRA": {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 16,
                "tinit": 25, "tfinal": 50, "deltaT": 10,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"]},
    "IA3": {"peft_type": "IA3"},
    "prompt tuning": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                      "num_virtual_tokens": 8},
    "prefix tuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                      "num_virtual_tokens": 8},
}
# learning rates: full fine-tuning as usual for the rule, adapters 10x (their usual gap)
LR = {"adamw": 1e-3, "lion": 1e-4, "lomo": 3e-2, "adalomo": 1e-3}
ADAPTER_LR = 10.0
SEEDS = (0, 1, 2)
STEPS, BATCH, SEQ = 250, 8, 48
BASE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=258,
            max_position_embeddings=128, tie_word_embeddings=False)
LETTERS = "abcdefghij"


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One instance: (plain text for pretraining, instruction prompt, completion). Small
    spaces (single-digit sums, 3 of 5 letters) that a 2-block model learns in minutes;
    the lookups generalise. The instruction wraps the plain question in a chat-like
    turn, so tuning has to learn the format and carry the skill into it."""
    kind = rng.choice(("add", "rev", "key"))
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question, answer = f"{a}+{b}", str(a + b)
    elif kind == "rev":
        s = "".join(rng.choice(LETTERS[:5]) for _ in range(3))
        question, answer = f"rev {s}", s[::-1]
    else:
        keys = rng.sample(LETTERS, 3)
        vals = [rng.choice(LETTERS) for _ in keys]
        k = rng.randrange(3)
        question = f"k:{keys[k]} " + " ".join(f"{a}={v}" for a, v in zip(keys, vals))
        answer = vals[k]
    return f"{question}={answer}", f"User: {question}?\nAssistant: ", answer


def make_data(folder: Path, n_pre: int = 6000, n_tune: int = 2000, n_eval: int = 60
              ) -> dict[str, Path]:
    """The generated task family: pretraining text (every instance may appear), instruction
    records to tune on, and held-out instruction records whose instances the tuning
    records never hold (the facts are in the pretraining text, the format is not)."""
    rng = random.Random(0)
    seen, pre, tune, held = set(), [], [], []
    while len(held) < n_eval:
        plain, prompt, completion = _task(rng)
        if prompt not in seen:
            seen.add(prompt)
            held.append({"prompt": prompt, "completion": completion})
    while len(pre) < n_pre:
        pre.append({"text": _task(rng)[0]})
    while len(tune) < n_tune:
        plain, prompt, completion = _task(rng)
        if prompt not in seen:
            tune.append({"prompt": prompt, "completion": completion})
    files = {}
    for name, rows in (("pretrain", pre), ("tune", tune), ("eval", held)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def pretrain_base(folder: Path, data: Path, steps: int = 500) -> Path:
    """The base model, trained by ``train`` (AdamW, one process) on the plain tasks."""
    from transformers import LlamaConfig

    from collie_compile.cli import main as cli

    cfg_dir = folder / "base-config"
    LlamaConfig(**BASE).save_pretrained(cfg_dir)
    base = folder / "base"
    rc = cli(["train", str(cfg_dir), "--data", str(data), "--steps", str(steps),
              "--seq-len", "64", "--global-batch", "32", "--lr", "3e-3",
              "--lr-schedule", "cosine", "--warmup-steps", "20", "--save", str(base)])
    if rc != 0:
        raise SystemExit("pretraining the base failed")
    return base


def _encoder(base: Path) -> object:
    """``train``'s encoder for ``base``: its tokenizer where its folder has one, else
    UTF-8 bytes."""
    from collie_compile.data.tokenize import Encoder, tokenizer_files

    return Encoder(base if tokenizer_files(base) else None)


def _rows(records: list[dict], seq: int, enc: object) -> dict[str, torch.Tensor]:
    """One example per row as ``train``'s encoder tokenizes it (EOS last), right-padded;
    labels on the completion only."""
    from collie_compile.data.records import Record

    ids = torch.full((len(records), seq), enc.eos)
    labels = torch.full((len(records), seq), -100)
    mask = torch.zeros((len(records), seq), dtype=torch.long)
    for i, r in enumerate(records):
        toks, keep = enc.encode(Record("study", r), None)
        toks, keep = toks[:seq], keep[:seq]
        ids[i, :len(toks)] = torch.tensor(toks)
        labels[i, :len(toks)] = torch.tensor([t if k else -100 for t, k in zip(toks, keep)])
        mask[i, :len(toks)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def fine_tune(base: Path, records: list[dict], optimizer: str, method: str, seed: int,
              out: Path, enc: object) -> float:
    """One run of the grid: ``parallelize`` on this process, the budget's steps, saved.
    Returns its last training loss."""
    from transformers import AutoModelForCausalLM

    from collie_compile.runtime.options import read_peft_config
    from collie_compile.runtime.parallel_model import parallelize

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    fields = METHODS[method]
    peft = None
    if fields is not None:
        (out.parent / f"{method}.json").write_text(json.dumps(fields))
        peft = read_peft_config(out.parent / f"{method}.json", steps=STEPS)
    lr = LR[optimizer] * (ADAPTER_LR if fields else 1.0)
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH, optimizer=optimizer,
                     lr=lr, dp=1, tp=1, pp=1, peft=peft)
    order = random.Random(seed)
    loss = float("nan")
    for _ in range(STEPS):
        batch = _rows(order.sample(records, BATCH), SEQ, enc)
        loss = pm.train_step(batch)
    pm.save_pretrained(out)
    return loss


def score(base: Path, out: Path, method: str, held: list[dict], enc: object
          ) -> tuple[float, float]:
    """(exact-match accuracy of greedy generation, mean completion loss) on ``held``."""
    from transformers import AutoModelForCausalLM

    if METHODS[method] is None:
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
        if METHODS[method]["peft_type"] == "ADALORA":
            # peft's AdaLoRA model computes no loss outside training (it looks for its
            # trainable adapter); merged, the same weights run as a plain model
            model = model.merge_and_unload()
    model.eval()
    hits = 0
    with torch.no_grad():
        for r in held:
            ids = (enc.tok(r["prompt"])["input_ids"] if enc.tok is not None
                   else list(r["prompt"].encode()))
            prompt = torch.tensor([ids])
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=8, do_sample=False, eos_token_id=enc.eos,
                                 pad_token_id=enc.eos)
            new = gen[0, prompt.shape[1]:].tolist()
            new = new[:new.index(enc.eos)] if enc.eos in new else new
            text = (enc.tok.decode(new, skip_special_tokens=True) if enc.tok is not None
                    else bytes(new).decode(errors="replace"))
            hits += text.strip() == r["completion"].strip()
        # transformers' (or peft's, virtual tokens labelled -100) mean completion loss
        loss = model(**_rows(held, SEQ, enc)).loss
    return hits / len(held), float(loss)


def _reading(results: dict, base_acc: float) -> str:
    """The grid's ranking in words, from its numbers."""
    mean = {k: statistics.mean(a for a, _ in v) for k, v in results.items()}
    best = max(mean, key=mean.get)
    by_method = {m: max((k for k in mean if k[0] == m), key=mean.get)
                 for m in dict.fromkeys(k[0] for k in mean)}
    full = {o: mean[("full", o)] for o in OPTIMIZERS if ("full", o) in mean}
    return ("What this grid shows (exact match on held-out instances, mean of the seeds): "
            f"the best run is {best[0]} with {best[1]} ({mean[best]:.3f}; the base "
            f"{base_acc:.3f}). Best optimizer per method: " + ", ".join(
                f"{m} {o} {mean[(m, o)]:.3f}" for m, (_, o) in by_method.items())
            + ". Full fine-tuning by optimizer: " + ", ".join(
                f"{o} {v:.3f}" for o, v in full.items()) + ".")


def main(out: str | None = None, data: str | None = None, model: str | None = None,
         seeds: tuple[int, ...] = SEEDS) -> None:
    start = time.perf_counter()
    rep = Report("study-instruct", out)
    rep.add(__doc__.split("\n\n", 1)[1].strip())
    with tempfile.TemporaryDirectory(prefix="study-instruct-") as tmp:
        work = Path(tmp)
        if data is None:
            files = make_data(work)
            base = Path(model) if model else pretrain_base(work, files["pretrain"])
        else:  # real data: records to tune on; the last 150 held out
            rows = [json.loads(x) for x in Path(data).read_text().splitlines() if x.strip()]
            files = {"tune": work / "tune.jsonl", "eval": work / "eval.jsonl"}
            files["tune"].write_text("".join(json.dumps(r) + "\n" for r in rows[:-150]))
            files["eval"].write_text("".join(json.dumps(r) + "\n" for r in rows[-150:]))
            base = Path(model)
        tune = [json.loads(x) for x in files["tune"].read_text().splitlines()]
        held = [json.loads(x) for x in files["eval"].read_text().splitlines()]
        if any("prompt" not in r or "completion" not in r for r in tune + held):
            raise SystemExit("study-instruct reads prompt/completion records")
        enc = _encoder(base)
        base_acc, base_loss = score(base, base, "full", held, enc)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        refused: dict[tuple[str, str], str] = {}  # (method, optimizer) -> why
        for method in METHODS:
            for optimizer in OPTIMIZERS:
                for seed in seeds:
                    run = work / f"{method}-{optimizer}-{seed}".replace(" ", "_")
                    try:
                        fine_tune(base, tune, optimizer, method, seed, run, enc)
                    except CollieError as e:  # a refusal: reported, the grid goes on
                        refused[(method, optimizer)] = str(e).splitlines()[0]
                        break
                    results.setdefault((method, optimizer), []).append(
                        score(base, run, method, held, enc))
    rows = []
    for (method, optimizer), runs in results.items():
        accs, losses = [a for a, _ in runs], [x for _, x in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append([method, optimizer, f"{statistics.mean(accs):.3f} ± {sd:.3f}",
                     f"{statistics.mean(losses):.3f}",
                     " ".join(f"{a:.2f}" for a in accs)])
    rep.add(f"Base model before tuning: exact match {base_acc:.3f}, held-out loss "
            f"{base_loss:.3f}. Each run: {STEPS} steps of {BATCH} examples (seq {SEQ}); "
            f"learning rates {LR} for full fine-tuning, x{ADAPTER_LR:g} for adapters; seeds "
            f"{list(seeds)} (the adapters' init, the batches' order).\n\n" + table(
                ["method", "optimizer", "exact match (mean ± sd)", "held-out loss",
                 "per seed"], rows, right=(2, 3)))
    rep.add(_reading(results, base_acc))
    if refused:
        rep.add("Refused, with the reason:\n\n" + "\n".join(
            f"- {m} with {o}: {why}" for (m, o), why in refused.items()))

    def draw(ax: object) -> None:
        methods = [m for m in METHODS if any(k[0] == m for k in results)]
        for k, optimizer in enumerate(OPTIMIZERS):
            accs = [[a for a, _ in results.get((m, optimizer), [(0, 0)])] for m in methods]
            ax.bar([i + (k - 1.5) * 0.2 for i in range(len(methods))],
                   [statistics.mean(a) for a in accs], width=0.2, label=optimizer,
                   yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs],
                   capsize=2)
        ax.axhline(base_acc, color="gray", linestyle=":", label="base")
        ax.set_xticks(range(len(methods)), methods, fontsize=7)
        ax.set_ylabel("exact match (held out)")
        ax.set_title("Instruction tuning: optimizer x method, mean and sd over seeds")
        ax.legend(fontsize=6)

    rep.plot("study-instruct", draw)
    rep.add(f"Ran in {time.perf_counter() - start:.0f} s.")
    rep.save()
