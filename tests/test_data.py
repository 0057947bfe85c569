"""Stage one's data side: reading every source format, tokenizing, packing, chat masks, identity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus

from kd_pipeline.cache.data import DataSpec, encode_batch, iter_documents, iter_sequences, source_fingerprint
from kd_pipeline.errors import DataError


def encode_document(doc, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """One document's ``(input_ids int32, loss_mask bool)`` as it enters the packed stream."""
    ids, mask, _ = encode_batch([doc], tokenizer)
    return ids, mask


def same_source(a: dict, b: dict) -> bool:
    """Whether two source fingerprints name the same data (path ignored, as in the cache identity)."""
    return a.get("files") == b.get("files") and a.get("sha256") == b.get("sha256")


CHATS = [
    [
        {"role": "system", "content": "You are a sailor on the pequod."},
        {"role": "user", "content": "Where is the white whale?"},
        {"role": "assistant", "content": "Under the deep cold sea, captain."},
        {"role": "user", "content": "And the crew?"},
        {"role": "assistant", "content": "Asleep on deck before the storm."},
    ],
    [
        {"role": "user", "content": "Say something about ahab."},
        {"role": "assistant", "content": "Ahab saw the whale at night!"},
    ],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _records():
    docs = make_corpus(40, seed=7)
    records: list[dict] = [{"text": d} for d in docs]
    records.insert(5, {"messages": CHATS[0]})
    records.insert(17, {"messages": CHATS[1]})
    return records


def _expected_docs(records):
    return [r["messages"] if "messages" in r else r["text"] for r in records]


def _columnar(records):
    # Both columns on every row, null where a record lacks one: what parquet/arrow sources look like.
    return [{"text": r.get("text"), "messages": r.get("messages")} for r in records]


def _write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _write_zst(path: Path, records) -> Path:
    import zstandard

    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return path


def _write_parquet(path: Path, records) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_columnar(records)), path, row_group_size=7)
    return path


# ---------------------------------------------------------------------------------------------------
# Reading


def test_every_format_yields_the_same_documents(tmp_path):
    import datasets

    records = _records()
    want = _expected_docs(records)
    paths = {
        "jsonl": _write_jsonl(tmp_path / "c.jsonl", records),
        "zst": _write_zst(tmp_path / "c.jsonl.zst", records),
        "parquet": _write_parquet(tmp_path / "c.parquet", records),
    }
    ds = datasets.Dataset.from_list(_columnar(records))
    ds.save_to_disk(str(tmp_path / "hf_ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "hf_dict"))
    paths["hf_ds"] = tmp_path / "hf_ds"
    paths["hf_dict"] = tmp_path / "hf_dict"
    # A directory of shards (mixed types, plus a file to ignore) and a glob over shards.
    shards = tmp_path / "shards"
    (shards / "b").mkdir(parents=True)
    _write_jsonl(shards / "a.jsonl", records[:10])
    _write_parquet(shards / "b" / "x.parquet", records[10:25])
    _write_zst(shards / "c.jsonl.zst", records[25:])
    (shards / "README.md").write_text("not data")
    paths["dir"] = shards
    globbed = tmp_path / "globbed"
    globbed.mkdir()
    for i in range(0, len(records), 9):
        _write_jsonl(globbed / f"part-{i:03d}.jsonl", records[i : i + 9])
    paths["glob"] = str(globbed / "part-*.jsonl")

    for name, path in paths.items():
        assert list(iter_documents(path)) == want, name
    assert len(list(iter_documents(tmp_path / "hf_dict", split="test"))) == 3


def test_txt_whole_file_is_one_document(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    texts = ["First paragraph.\n\nSecond paragraph of the same file.\n", "Another file."]
    for i, t in enumerate(texts):
        (d / f"{i:02d}.txt").write_text(t)
    assert list(iter_documents(d)) == texts
    assert list(iter_documents(d / "00.txt")) == texts[:1]


def test_custom_field_names(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", [{"body": "hello there"}, {"conv": CHATS[1]}])
    assert list(iter_documents(p, text_field="body", messages_field="conv")) == ["hello there", CHATS[1]]


def test_datasetdict_needs_existing_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="validation"):
        list(iter_documents(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd", split="validation")) == ["a"]


def test_missing_field_names_line_and_fields(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"body": "x", "id": 3}) + "\n")
    with pytest.raises(DataError) as e:
        list(iter_documents(p))
    msg = str(e.value)
    assert "bad.jsonl:3" in msg and "'body'" in msg and "'id'" in msg and "'text'" in msg and "'messages'" in msg


def test_missing_field_in_parquet_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "n": 1}, {"text": None, "n": 2}]), p)
    with pytest.raises(DataError, match=r"row 1.*'n'"):
        list(iter_documents(p))
    with pytest.raises(DataError, match=r"neither a 'body'.*columns: \['text', 'n'\]"):
        list(iter_documents(p, text_field="body"))


def test_other_errors(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.parquet")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2: invalid JSON"):
        list(iter_documents(tmp_path / "broken.jsonl"))
    (tmp_path / "badmsg.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"badmsg.jsonl:1: messages\[0\]"):
        list(iter_documents(tmp_path / "badmsg.jsonl"))
    with pytest.raises(DataError, match="seq_len"):
        DataSpec(tmp_path / "empty.jsonl", 1)


def test_tokenizer_without_eos(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.eos_token = None
    assert t.eos_token_id is None
    p = _write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="no eos"):
        next(iter_sequences(DataSpec(p, 8), t))


# ---------------------------------------------------------------------------------------------------
# Packing


def _stream(seqs):
    return np.concatenate([s[0] for s in seqs]), np.concatenate([s[1] for s in seqs])


def test_packing_plain_text(tmp_path, tok, corpus_jsonl):
    length = 64
    docs = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()]
    expected = []
    for d in docs:
        expected += tok(d)["input_ids"] + [tok.eos_token_id]
    seqs = list(iter_sequences(DataSpec(corpus_jsonl, length), tok))

    assert len(seqs) == math.ceil(len(expected) / length)
    for ids, mask in seqs:
        assert ids.shape == (length,) and ids.dtype == np.int32
        assert mask.shape == (length,) and mask.dtype == np.bool_
        assert not mask[0] and mask[1:].any()
    ids, mask = _stream(seqs)
    n = len(expected)
    assert ids[:n].tolist() == expected
    # Real tokens are all trained but each sequence's first; padding is pad_token_id, untrained.
    real = np.ones(len(ids), dtype=bool)
    real[n:] = False
    want_mask = real.copy()
    want_mask[::length] = False
    assert (mask == want_mask).all()
    assert n % length != 0, "corpus should leave a partial last sequence"
    assert (ids[n:] == tok.pad_token_id).all()


def test_packing_caps(tok, corpus_jsonl):
    length = 32
    full = list(iter_sequences(DataSpec(corpus_jsonl, length), tok))
    assert len(full) > 10

    def run(**kw):
        return list(iter_sequences(DataSpec(corpus_jsonl, length, **kw), tok))

    for max_tokens, n in [(1, 1), (32, 1), (33, 2), (300, 10)]:
        capped = run(max_tokens=max_tokens)
        assert len(capped) == n
        assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(capped, full))
    assert len(run(max_sequences=3)) == 3
    assert len(run(max_sequences=3, max_tokens=10_000)) == 3
    assert len(run(max_sequences=30, max_tokens=64)) == 2
    assert len(run(max_sequences=10_000)) == len(full)  # a cap above the data changes nothing
    assert (run(max_sequences=10_000)[-1][0] == full[-1][0]).all()


def test_empty_documents_skipped(tmp_path, tok):
    p = _write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "the whale"}, {"messages": []}])
    ((ids, mask),) = list(iter_sequences(DataSpec(p, 16), tok))
    n = len(tok("the whale")["input_ids"]) + 1
    assert ids[:n].tolist() == tok("the whale")["input_ids"] + [tok.eos_token_id]
    assert mask.tolist() == [False] + [True] * (n - 1) + [False] * (16 - n)


def test_determinism_and_fingerprint(tmp_path, tok):
    d = tmp_path / "src"
    d.mkdir()
    records = _records()
    _write_jsonl(d / "a.jsonl", records[:20])
    _write_parquet(d / "b.parquet", records[20:])
    spec = DataSpec(d, 48)
    one = list(iter_sequences(spec, tok))
    two = list(iter_sequences(spec, tok))
    assert len(one) == len(two)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(one, two))

    fp = source_fingerprint(d)
    assert fp == source_fingerprint(d)
    assert [f[0] for f in fp["files"]] == ["a.jsonl", "b.parquet"]
    assert fp["files"][0][1] == (d / "a.jsonl").stat().st_size
    assert len(fp["sha256"]) == 64
    # Same bytes elsewhere: same source; one changed byte: a different source.
    other = tmp_path / "copy"
    other.mkdir()
    for f in ("a.jsonl", "b.parquet"):
        (other / f).write_bytes((d / f).read_bytes())
    assert same_source(fp, source_fingerprint(other))
    (other / "a.jsonl").write_text((d / "a.jsonl").read_text().replace("whale", "whalE", 1))
    changed = source_fingerprint(other)
    assert changed["files"] == fp["files"] and changed["sha256"] != fp["sha256"]
    assert not same_source(fp, changed)
    assert source_fingerprint(d / "a.jsonl")["files"] == [["a.jsonl", fp["files"][0][1]]]
    globbed = source_fingerprint(str(d / "*.jsonl"))
    assert globbed["files"] == fp["files"][:1] and globbed["path"] == str(d / "*.jsonl")


# ---------------------------------------------------------------------------------------------------
# Chat masks


def _masked_runs(ids, mask, tok):
    """Decoded text of each maximal run of trained tokens."""
    runs, start = [], None
    for t, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append(tok.decode(ids[start:t].tolist()))
            start = None
    return runs


def test_chat_mask_is_exactly_assistant_output(tok):
    conv = CHATS[0]
    ids, mask = encode_document(conv, tok)
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(conv, tokenize=False) + tok.eos_token
    assert _masked_runs(ids, mask, tok) == [
        "Under the deep cold sea, captain.<|im_end|>",
        "Asleep on deck before the storm.<|im_end|>",
    ]
    untrained = tok.decode(ids[~mask].tolist())
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert "<|im_start|>assistant\n" in untrained  # the header is a prompt, not a target
    assert not mask[-1]  # the EOS separator after a conversation


def test_chat_template_without_generation_prompt(tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    ids, mask = encode_document(CHATS[1], t)
    assert _masked_runs(ids, mask, t) == ["Ahab saw the whale at night!<|im_end|>"]


def test_chat_template_breaking_prefix_property(tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = "{{ messages|length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="prefix property"):
        encode_document(CHATS[1], t)


def test_chat_packed_mask_travels_with_tokens(tmp_path, tok):
    records = _records()
    p = _write_jsonl(tmp_path / "c.jsonl", records)
    length = 40
    ids, mask = _stream(list(iter_sequences(DataSpec(p, length), tok)))
    parts = [encode_document(d, tok) for d in _expected_docs(records)]
    want_ids = np.concatenate([a for a, _ in parts])
    want_mask = np.concatenate([m for _, m in parts])
    want_mask[::length] = False
    n = len(want_ids)
    assert (ids[:n] == want_ids).all()
    assert (mask[:n] == want_mask).all() and not mask[n:].any()
    # The chat documents contribute exactly their assistant turns.
    chat_runs = sum(
        (_masked_runs(a, m, tok) for (a, m), d in zip(parts, _expected_docs(records)) if isinstance(d, list)), []
    )
    assert chat_runs == [
        "Under the deep cold sea, captain.<|im_end|>",
        "Asleep on deck before the storm.<|im_end|>",
        "Ahab saw the whale at night!<|im_end|>",
    ]
