"""Test data as users bring it: a tokenizer folder made with the `tokenizers` library
(no download) and JSON Lines chat records."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat dog sat ran on a mat log red blue big small what where is are why how "
         "yes no it was here there one two three four five").split()
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer with a chat template and EOS, saved as HF saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [".", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "user", "content": sentence(rng, rng.randint(3, 9)) + " ?"},
                {"role": "assistant", "content": sentence(rng, rng.randint(4, 12)) + " ."}]
        if rng.random() < 0.3:
            msgs = [{"role": "system", "content": sentence(rng, 3)}] + msgs
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
