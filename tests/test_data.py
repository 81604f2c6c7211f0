"""Training data: records from text, JSON Lines and Parquet files, tokenized with a real
tokenizer folder (built here with `tokenizers`), loss masks, the cache, and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_data import chat_records, make_tokenizer, write_jsonl

from collie_compile.data.packing import IGNORE_INDEX, PackedTokens
from collie_compile.data.records import Record
from collie_compile.data.tokenize import Encoder, tokenized
from collie_compile.errors import CollieError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_chat_record_counts_assistant_turns_only(tok_dir: Path) -> None:
    """The template renders user and assistant turns; only the assistant's words and the
    end of its turn count, and EOS ends the document once."""
    from transformers import AutoTokenizer

    enc = Encoder(tok_dir)
    rec = Record("x.jsonl:1", {"messages": [
        {"role": "system", "content": "big red"},
        {"role": "user", "content": "where is the cat ?"},
        {"role": "assistant", "content": "on the mat ."},
        {"role": "user", "content": "why ?"},
        {"role": "assistant", "content": "it was here ."}]})
    ids, keep = enc.encode(rec, None)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    words = tok.convert_ids_to_tokens(ids)
    kept = [w for w, k in zip(words, keep) if k]
    assert kept == ["on", "the", "mat", ".", "</s>", "it", "was", "here", ".", "</s>"]
    assert words[0] == "<|system|>" and words[-1] == "</s>" and words.count("</s>") == 5
    assert ids == tok.apply_chat_template(rec.value["messages"], tokenize=True,
                                          return_dict=False)


def test_prompt_completion_text_counts_the_completion(tok_dir: Path) -> None:
    enc = Encoder(tok_dir)
    ids, keep = enc.encode(Record("a:1", {"prompt": "the cat sat on ", "completion": "a mat ."}),
                           None)
    from transformers import AutoTokenizer

    words = AutoTokenizer.from_pretrained(tok_dir).convert_ids_to_tokens(ids)
    assert words == ["the", "cat", "sat", "on", "a", "mat", ".", "</s>"]
    assert keep == [False] * 4 + [True] * 4
    # bytes: the same split, by byte
    ids, keep = Encoder(None).encode(Record("a:1", {"prompt": "ab", "completion": "é"}), None)
    assert ids == [97, 98, 0xC3, 0xA9, 0] and keep == [False, False, True, True, True]


def test_a_bpe_token_across_the_prompt_boundary_counts(tmp_path: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2's kind) merges a prompt's last space into the
    completion's first word ("Ġthe"): that token used to be classed as prompt, so the
    completion's first characters were never learned."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["what is the answer ? the answer is the cat ."] * 50,
                            vocab_size=300, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "bpe")
    enc = Encoder(tmp_path / "bpe")
    prompt, completion = "what is ", "the answer ."
    ids, keep = enc.encode(Record("a:1", {"prompt": prompt, "completion": completion}), None)
    pieces = enc.tok.convert_ids_to_tokens(ids)
    assert "Ġthe" in pieces  # the space of the prompt joined the completion's word
    spans = enc.tok(prompt + completion, return_offsets_mapping=True)["offset_mapping"]
    # every completion character is inside a counted token, and no counted token is
    # prompt alone
    for c in range(len(prompt), len(prompt + completion)):
        assert any(k and a <= c < b for (a, b), k in zip(spans, keep, strict=False)), c
    assert not any(k and b <= len(prompt) for (a, b), k in zip(spans, keep, strict=False))
    assert keep[pieces.index("Ġthe")] and keep[-1]


def test_bad_records_name_file_and_line(tmp_path: Path, tok_dir: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "the cat"}\n{"text": "a dog"\n\n{"text": "one two"}\n')
    with pytest.raises(CollieError, match=rf"{f}:2: not a JSON object.*--bad-records skip"):
        tokenized([f], Encoder(tok_dir))
    notes = []
    out = tokenized([f], Encoder(tok_dir), on_error="skip", log=notes.append)
    data = PackedTokens.from_cache(out, "train", 4)
    assert data.num_tokens == 2 + 1 + 2 + 1  # two records, each with EOS
    assert "skipped 1 bad record" in notes[0] and f"{f}:2" in notes[0]
    g = tmp_path / "e.jsonl"
    write_jsonl(g, [{"body": "the cat"}])
    with pytest.raises(CollieError, match=rf"{g}:1: no field 'content' \(it has 'body'\)"):
        tokenized([g], Encoder(tok_dir), text_field="content")
    with pytest.raises(CollieError, match=rf"{g}:1: none of the fields"):
        tokenized([g], Encoder(tok_dir))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CollieError, match="no tokens to train on"):
        tokenized([empty], Encoder(tok_dir))
    with pytest.raises(CollieError, match="tokenizer folder .*nope does not exist"):
        Encoder(tmp_path / "nope")
    with pytest.raises(CollieError, match="chat records need a tokenizer with a chat template"):
        tokenized([write_jsonl(tmp_path / "c.jsonl", chat_records(2))], Encoder(None))


def test_parquet_reads_as_jsonl_does(tmp_path: Path, tok_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = chat_records(20)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl", records)
    a = PackedTokens.from_cache(tokenized([tmp_path / "d.parquet"], Encoder(tok_dir)),
                                "train", 16)
    b = PackedTokens.from_cache(tokenized([tmp_path / "d.jsonl"], Encoder(tok_dir)),
                                "train", 16)
    assert a.num_tokens == b.num_tokens > 200
    ks = list(range(a.num_sequences))
    for key in ("input_ids", "labels"):
        assert torch.equal(a.rows(ks)[key], b.rows(ks)[key])


def test_tokens_are_cached_until_the_file_changes(tmp_path: Path, tok_dir: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", chat_records(5))
    notes: list[str] = []
    first = tokenized([f], Encoder(tok_dir), log=notes.append)
    again = tokenized([f], Encoder(tok_dir), log=notes.append)
    assert first == again and notes[0].startswith("tokenized 5 documents")
    assert "tokens cached in" in notes[1]  # the second read the cache
    write_jsonl(f, chat_records(6))
    assert tokenized([f], Encoder(tok_dir), log=notes.append) != first
    assert notes[2].startswith("tokenized 6 documents")


def test_packing_visits_every_token_once_per_epoch(tmp_path: Path, tok_dir: Path) -> None:
    """Sequences are cut from the stream; an epoch's batches cover each one once, in a
    seeded order; data-parallel rows partition the batch."""
    f = write_jsonl(tmp_path / "d.jsonl", chat_records(30))
    path = tokenized([f], Encoder(tok_dir), eval_fraction=0.2, seed=3)
    data = PackedTokens.from_cache(path, "train", 16, seed=3)
    held = PackedTokens.from_cache(path, "eval", 16)
    with open(f) as fh:
        docs = [json.loads(line) for line in fh]
    assert data.num_tokens + held.num_tokens == sum(
        len(Encoder(tok_dir).encode(Record("", d), None)[0]) for d in docs)
    n = data.num_sequences
    seen = [data.sequence_at(p) for p in range(n)]
    assert sorted(seen) == list(range(n)) and seen != list(range(n))
    assert [data.sequence_at(p) for p in range(n, 2 * n)] != seen  # a new order per epoch
    rows = data.rows(list(range(n)))
    ids = rows["input_ids"].flatten()[:data.num_tokens]
    assert torch.equal(ids, torch.as_tensor(data._ids[:]).long())
    assert (rows["input_ids"].flatten()[data.num_tokens:] == data.eos).all()
    assert (rows["labels"].flatten()[data.num_tokens:] == IGNORE_INDEX).all()
    whole = data.batch(5, 4)
    halves = [data.batch(5, 4, rows=slice(0, 2)), data.batch(5, 4, rows=slice(2, 4))]
    for key in ("input_ids", "labels"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    again = PackedTokens.from_cache(path, "train", 16, seed=3)
    assert torch.equal(again.batch(5, 4)["input_ids"], whole["input_ids"])


def test_users_documents_pack_with_their_labels() -> None:
    """A user's tokenized documents (a datasets.Dataset's rows): EOS after each that
    lacks it, their -100 labels kept out of the targets."""
    docs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 3]}]
    data = PackedTokens.from_documents(docs, seq_len=4, eos=3)
    rows = data.rows([0, 1])
    assert rows["input_ids"].tolist() == [[5, 6, 7, 3], [8, 9, 3, 3]]
    assert rows["labels"].tolist() == [[-100, 6, 7, 3], [8, 9, 3, -100]]
    with pytest.raises(CollieError, match="document 0: 2 labels for 3 input_ids"):
        PackedTokens.from_documents([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 4, 3)


def test_separate_documents_number_positions_as_transformers_flattening_does() -> None:
    """--separate-documents: rows carry the position_ids and -100 first labels that
    transformers' DataCollatorWithFlattening gives the same documents (EOS ends each;
    a document cut by a row's end goes on from position 0 in the next row)."""
    from transformers import DataCollatorWithFlattening

    docs = [[5, 6, 7, 3], [8, 3], [9, 10, 11, 3], [12, 3]]
    data = PackedTokens.from_documents([{"input_ids": d} for d in docs], seq_len=6, eos=3,
                                       separate_documents=True)
    rows = data.rows([0, 1])
    # row 0 holds docs 0, 1; row 1 the rest
    flat = [DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in part])
            for part in (docs[:2], docs[2:])]
    for key in ("input_ids", "labels", "position_ids"):
        assert rows[key].tolist() == [f[key][0].tolist() for f in flat], key
    cut = PackedTokens.from_documents([{"input_ids": d} for d in docs], seq_len=5, eos=3,
                                      separate_documents=True).rows([1])
    assert cut["input_ids"].tolist() == [[3, 9, 10, 11, 3]]
    assert cut["position_ids"].tolist() == [[0, 0, 1, 2, 3]]
    assert "position_ids" not in PackedTokens.from_documents(
        [{"input_ids": d} for d in docs], seq_len=6, eos=3).rows([0])


def test_more_bad_records_and_folders(tmp_path: Path, tok_dir: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "the cat"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CollieError, match=rf"{f}:2: not a JSON object"):
        tokenized([f], Encoder(tok_dir))
    answer = [{"role": "assistant", "content": "y"}]
    g = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"content": "x"}], "completion": answer}])
    with pytest.raises(CollieError, match=rf"{g}:1: 'prompt' must be a non-empty list"):
        tokenized([g], Encoder(tok_dir))
    h = write_jsonl(tmp_path / "t.jsonl", [{"text": 3}])
    with pytest.raises(CollieError, match=rf"{h}:1: field 'text' is int, not text"):
        tokenized([h], Encoder(tok_dir))
    # a folder: its data files, not hidden copies nor the dataset card
    d = tmp_path / "ds"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", chat_records(3))
    write_jsonl(d / ".ipynb_checkpoints" / "a.jsonl", chat_records(3))
    (d / "README.md").write_text("# a dataset card")
    from collie_compile.data.records import data_files

    assert data_files([d]) == [d / "a.jsonl"]
    # a split whose documents count nothing is refused, not evaluated as loss 0
    k = write_jsonl(tmp_path / "k.jsonl", [{"text": "the cat"},
                                           {"prompt": "a dog", "completion": ""}])
    with pytest.raises(CollieError, match="split has no tokens that count"):
        tokenized([k], Encoder(tok_dir), eval_fraction=0.5)
