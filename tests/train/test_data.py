"""Every data format on a small file, response-only loss, packing, caching and malformed rows."""

from __future__ import annotations

import csv
import json

import pytest

from peftkit.errors import ConfigError
from peftkit.train.batching import collate, micro_batch, pack, split
from peftkit.train.data import IGNORE, load_examples
from peftkit.train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _response(ex):
    return TOK.decode([t for t in ex["labels"] if t != IGNORE])


def test_plain_text_trains_on_every_token(tmp_path):
    ex = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), "auto", "causal_lm", TOK, 64).examples[0]
    assert ex["input_ids"] == [1, *[b + 3 for b in b"hello"], 2] and ex["labels"] == ex["input_ids"]


def test_instruction_loss_only_on_response(tmp_path):
    rows = [{"instruction": "Add", "input": "1+1", "output": "2"}, {"instruction": "Say hi", "output": "hi"}]
    exs = load_examples(_jsonl(tmp_path / "i.jsonl", rows), "instruction", "causal_lm", TOK, 256).examples
    assert _response(exs[0]) == "2" and _response(exs[1]) == "hi"
    assert TOK.decode(exs[0]["input_ids"][: exs[0]["prompt_len"]]).endswith("### Response:\n")
    assert "1+1" in TOK.decode(exs[0]["input_ids"]) and exs[0]["labels"][-1] == TOK.eos_id


def test_chat_loss_only_on_assistant_turns(tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    ex = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), "auto", "causal_lm", TOK, 512).examples[0]
    assert TOK.decode(ex["input_ids"]) == TOK.chat(msgs, add_generation_prompt=False)
    assert _response(ex) == "hello\nciao\n"


def test_classification_csv_and_label_inference(tmp_path):
    path = tmp_path / "c.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([["good", "pos"], ["bad", "neg"], ["meh", "neu"]])
    data = load_examples(path, "auto", "classification", TOK, 16)
    assert data.labels == ["neg", "neu", "pos"]
    assert [e["labels"] for e in data.examples] == [2, 0, 1]
    batch = collate(data.examples, TOK.pad_id, "classification")
    assert batch["labels"].tolist() == [2, 0, 1] and batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 0]


def test_seq2seq_and_qa(tmp_path):
    s = load_examples(
        _jsonl(tmp_path / "s.jsonl", [{"source": "abc", "target": "xyz"}]), "auto", "seq2seq", TOK, 8
    ).examples[0]
    assert TOK.decode(s["input_ids"]) == "abc" and TOK.decode(s["labels"]) == "xyz" and s["answers"] == ["xyz"]
    squad = {
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": {"text": ["France", "in France"], "answer_start": [12, 9]},
    }
    q = load_examples(_jsonl(tmp_path / "q.jsonl", [squad]), "auto", "causal_lm", TOK, 256).examples[0]
    assert _response(q) == " France" and q["answers"] == ["France", "in France"]
    q2 = load_examples(tmp_path / "q.jsonl", "qa", "seq2seq", TOK, 256).examples[0]
    assert TOK.decode(q2["labels"]) == "France" and "Where is Paris?" in TOK.decode(q2["input_ids"])


def test_parquet_and_datasets_dir_when_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    assert len(load_examples(tmp_path / "p.parquet", "auto", "causal_lm", TOK, 8).examples) == 2


def test_malformed_rows_named_or_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n{"text": 3}\n{"text": "fine"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: malformed row: invalid JSON.*skip_bad_rows=true"):
        load_examples(path, "auto", "causal_lm", TOK, 8)
    data = load_examples(path, "auto", "causal_lm", TOK, 8, skip_bad_rows=True)
    assert data.skipped == 2 and len(data.examples) == 2
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: malformed row: field 'text' must be a non-empty string"):
        load_examples(path, "auto", "causal_lm", TOK, 8)


def test_jsonl_lines_end_at_newlines_only_and_a_line_not_utf8_is_a_malformed_row(tmp_path):
    path = tmp_path / "u.jsonl"
    rows = [{"text": "one\u2028two\x1cthree"}, {"text": "fine"}]  # JSON strings may hold these raw
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = load_examples(path, "auto", "causal_lm", TOK, 64).examples
    assert [TOK.decode(ex["input_ids"]) for ex in examples] == [r["text"] for r in rows]
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')  # line 2 is Latin-1
    with pytest.raises(ConfigError, match=r"u.jsonl:2: malformed row: not UTF-8 text \(byte 0xe9 at column 14\); "
                       "save the file as UTF-8"):
        load_examples(path, "auto", "causal_lm", TOK, 8)
    data = load_examples(path, "auto", "causal_lm", TOK, 8, skip_bad_rows=True)
    assert data.skipped == 1 and len(data.examples) == 2


def test_a_damaged_json_array_or_parquet_file_is_named(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "ok"},\n {"text": "cut')
    with pytest.raises(ConfigError, match=r"data file '.*a.json' is not valid JSON at line 2, column 11: "
                       "Unterminated string"):
        load_examples(path, "auto", "causal_lm", TOK, 8)
    path.write_bytes(b'[{"text": "\xff"}]')
    with pytest.raises(ConfigError, match=r"a.json' is not UTF-8 text \(byte 0xff at offset 11\); save it as UTF-8"):
        load_examples(path, "auto", "causal_lm", TOK, 8)
    pytest.importorskip("pyarrow")
    (tmp_path / "p.parquet").write_text("text\nnot parquet\n")
    with pytest.raises(ConfigError, match=r"p.parquet' cannot be read as Parquet \(.*\); pass a Parquet file"):
        load_examples(tmp_path / "p.parquet", "auto", "causal_lm", TOK, 8)


def test_csv_wrong_columns_and_unknown_extension(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\nfine,a\nbroken\n")
    with pytest.raises(ConfigError, match=r"c.csv:3: malformed row"):
        load_examples(path, "auto", "classification", TOK, 8, labels=["a"])
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(ConfigError, match="unknown type '.xml'"):
        load_examples(tmp_path / "d.xml", "auto", "causal_lm", TOK, 8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples(tmp_path / "none.jsonl", "auto", "causal_lm", TOK, 8)


def test_format_task_mismatch_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match="needs format classification"):
        load_examples(path, "auto", "classification", TOK, 8, labels=["x"])


def test_truncation_and_packing(tmp_path):
    rows = [{"instruction": "q", "output": "abcdef"}, {"text": "xyz"}]
    exs = load_examples(_jsonl(tmp_path / "m.jsonl", rows), "auto", "causal_lm", TOK, 10).examples
    assert all(len(e["input_ids"]) <= 10 and len(e["labels"]) == len(e["input_ids"]) for e in exs)
    packed = pack(exs, 4)
    flat = [t for e in exs for t in e["input_ids"]]
    assert [t for p in packed for t in p["input_ids"]] == flat
    assert all(len(p["input_ids"]) == 4 for p in packed[:-1])
    assert [t for p in packed for t in p["labels"]] == [t for e in exs for t in e["labels"]]


def test_tokenisation_cache_is_used(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    first = load_examples(path, "auto", "causal_lm", TOK, 8, cache_dir=str(tmp_path / "cache"))
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1
    blob = json.loads(cached[0].read_text())
    blob["examples"][0]["input_ids"] = [42]
    cached[0].write_text(json.dumps(blob))
    again = load_examples(path, "auto", "causal_lm", TOK, 8, cache_dir=str(tmp_path / "cache"))
    assert again.examples[0]["input_ids"] == [42] != first.examples[0]["input_ids"]
    other = load_examples(path, "auto", "causal_lm", TOK, 7, cache_dir=str(tmp_path / "cache"))
    assert other.examples[0]["input_ids"] != [42]


def test_batches_are_a_pure_function_of_seed_and_index():
    exs = [{"input_ids": [i + 3], "labels": [i + 3]} for i in range(10)]
    first_epoch = [e["input_ids"][0] for k in range(3) for e in micro_batch(exs, 3, 5, k)]
    assert sorted(first_epoch) == sorted(set(first_epoch)) and len(first_epoch) == 9
    assert micro_batch(exs, 3, 5, 4) == micro_batch(exs, 3, 5, 4)
    assert micro_batch(exs, 3, 5, 3) != micro_batch(exs, 3, 6, 3)
    train, held = split(exs, 0.3, 0)
    assert len(held) == 3 and len(train) == 7 and not ({id(e) for e in train} & {id(e) for e in held})


def test_length_grouped_batches_cover_the_epoch_and_group_lengths():
    exs = [{"input_ids": [3] * (1 + (i * 7) % 40), "labels": [3]} for i in range(64)]
    batches = [micro_batch(exs, 4, 0, k, group_by_length=True) for k in range(16)]
    seen = sorted(id(e) for b in batches for e in b)
    assert seen == sorted(id(e) for e in exs)  # every example exactly once per epoch
    spread = sum(max(len(e["input_ids"]) for e in b) - min(len(e["input_ids"]) for e in b) for b in batches)
    plain = [micro_batch(exs, 4, 0, k) for k in range(16)]
    spread_plain = sum(max(len(e["input_ids"]) for e in b) - min(len(e["input_ids"]) for e in b) for b in plain)
    assert spread < spread_plain / 3
    assert batches == [micro_batch(exs, 4, 0, k, group_by_length=True) for k in range(16)]


def test_a_missing_data_file_is_named_as_given_and_as_the_absolute_path_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_examples("data/none.jsonl", "auto", "causal_lm", TOK, 8)
    assert str(info.value).startswith(
        f"data file 'data/none.jsonl' does not exist (tried '{tmp_path}/data/none.jsonl': a relative path is resolved "
        "against the working directory, not the config file's); set data.train/data.eval to an existing local file")


def test_writing_the_cache_leaves_another_writers_temporary_file_alone(tmp_path):
    """Every rank of a distributed run may write the same cache at once: each through a temporary file of its own."""
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    first = load_examples(path, "auto", "causal_lm", TOK, 8, cache_dir=str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").glob("*.json")
    cache.unlink()
    theirs = cache.with_suffix(".tmp")
    theirs.write_text('{"examples": [{"input_ids": [4')  # another rank, halfway through
    load_examples(path, "auto", "causal_lm", TOK, 8, cache_dir=str(tmp_path / "cache"))
    assert theirs.read_text() == '{"examples": [{"input_ids": [4'
    assert json.loads(cache.read_text())["examples"] == first.examples
