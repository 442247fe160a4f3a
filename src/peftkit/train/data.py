"""Training data: read local files and turn rows into token examples (batching: :mod:`peftkit.train.batching`).

Files: ``.jsonl``/``.json``, ``.csv``, ``.parquet`` (pyarrow) or a ``datasets`` directory saved with
``save_to_disk``. Formats (``data.format``; ``auto`` decides from the first row's columns):

==============  =====================================  ==========================================
format          columns                                becomes
==============  =====================================  ==========================================
text            ``text``                               causal LM on every token
instruction     ``instruction``, ``input``?, ``output``  prompt (Alpaca template) → response
chat            ``messages`` [{role, content}, ...]    chat template; loss on assistant turns
classification  ``text``, ``label``                    sequence classification
seq2seq         ``source``, ``target``                 encoder input → decoder labels
qa              ``context``, ``question``, ``answers``   SQuAD-style: prompt → first answer
==============  =====================================  ==========================================

Where there is a prompt the loss is on response tokens only (prompt labels are -100). Examples
are plain ``{"input_ids", "labels", "prompt_len", "answers"}`` dicts; tokenisation is cached as
JSON keyed by file, format, tokenizer and length. A malformed row raises a :class:`ConfigError`
naming the file and line, or is skipped and counted with ``data.skip_bad_rows``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, require
from peftkit.io.atomic import write_text_atomic
from peftkit.train.tokenizer import Tokenizer

Example = dict[str, Any]
IGNORE = -100
PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
QA_PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"


class BadRow(ValueError):
    """A row that does not fit its format (internal; reported with file and line)."""


def data_file(path: str | Path) -> Path:
    """``path`` as a :class:`Path`, once it exists.

    Raises:
        ConfigError: it does not (naming the absolute path tried).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data file {str(path)!r} does not exist (tried {str(p.absolute())!r}: a relative path is "
                          "resolved against the working directory, not the config file's); set data.train/data.eval "
                          "to an existing local file, or give its absolute path")
    return p


def check_data_files(train: str, eval_path: str | None) -> None:
    """Raise before any work what loading the data would: ``train`` unset, or a named file missing.

    Raises:
        ConfigError: as :func:`data_file`, or ``train`` empty.
    """
    if not train:
        raise ConfigError("data.train is not set; name the training data, e.g. data.train=train.jsonl "
                          "(JSONL, CSV, Parquet or a datasets directory)")
    for path in (train, eval_path):
        if path:
            data_file(path)


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, row)`` from a local data file or a saved ``datasets`` directory.

    Rows of JSONL that are not valid JSON are yielded as :class:`BadRow` values so the caller can
    report or skip them.

    Raises:
        ConfigError: the path does not exist or has an unknown extension.
    """
    p = data_file(path)
    if p.is_dir():
        datasets = require("datasets", "data")
        for i, row in enumerate(datasets.load_from_disk(str(p)), start=1):  # type: ignore[attr-defined]
            yield i, dict(row)
    elif p.suffix in (".jsonl", ".json"):
        data = p.read_bytes()
        if p.suffix == ".json" and data.lstrip().startswith(b"["):
            yield from enumerate(_json_array(p, data), start=1)
            return
        # Lines end at "\n" only: a JSON string may hold U+2028 and other characters str.splitlines() splits at.
        for i, raw in enumerate(data.split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield i, BadRow(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the "
                                "file as UTF-8")
                continue
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, BadRow(f"invalid JSON ({exc.msg})")
    elif p.suffix == ".csv":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = p.read_text(encoding="latin-1")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:  # quoted fields may span lines: report the line the row ends on
            bad = None in row or None in row.values()
            yield reader.line_num, (BadRow("wrong number of columns") if bad else row)
    elif p.suffix == ".parquet":
        pq = require("pyarrow.parquet", "data")
        try:
            table = pq.read_table(str(p))  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"data file {str(p)!r} cannot be read as Parquet ({str(exc).splitlines()[0]}); "
                              "pass a Parquet file, or give the file the extension of its real format") from None
        yield from enumerate(table.to_pylist(), start=1)
    else:
        raise ConfigError(
            f"data file {str(p)!r} has unknown type {p.suffix!r}; "
            "allowed: .jsonl, .json, .csv, .parquet or a datasets directory"
        )


def _json_array(path: Path, data: bytes) -> list[Any]:
    """The rows of a ``.json`` file holding one array.

    Raises:
        ConfigError: the file is not UTF-8 or not valid JSON (named with the line and column).
    """
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data file {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data file {str(path)!r} is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}; fix the file, or write one object per line as .jsonl") from None
    return rows  # type: ignore[no-any-return]


def detect_format(row: dict[str, Any]) -> str:
    """The data format implied by a row's columns (see the module table).

    Raises:
        BadRow: no known format fits.
    """
    keys = set(row)
    for fmt, needed in (
        ("chat", {"messages"}),
        ("instruction", {"instruction", "output"}),
        ("seq2seq", {"source", "target"}),
        ("qa", {"context", "question", "answers"}),
        ("classification", {"text", "label"}),
        ("text", {"text"}),
    ):
        if needed <= keys:
            return fmt
    raise BadRow(
        f"columns {sorted(keys)} fit no format; expected text | instruction,output | messages | "
        "text,label | source,target | context,question,answers"
    )


def _str(row: dict[str, Any], key: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not optional and not value):
        raise BadRow(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _answers(row: dict[str, Any]) -> list[str]:
    ans = row.get("answers")
    if isinstance(ans, dict):
        ans = ans.get("text")
    if isinstance(ans, str):
        ans = [ans]
    if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
        raise BadRow(f"field 'answers' must be a string, a list of strings or {{'text': [...]}}, got {ans!r}")
    return list(ans)


def _causal(tok: Tokenizer, prompt: str, response: str, answers: list[str]) -> Example:
    p = tok.encode(prompt, special=True)
    r = tok.encode(response, special=False) + ([tok.eos_id] if tok.eos_id is not None else [])
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt_len": len(p), "answers": answers}


def _chat(tok: Tokenizer, messages: Any) -> Example:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise BadRow("field 'messages' must be a list of {role, content} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("a chat row needs at least one assistant message to train on")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.chat(messages[:i], add_generation_prompt=True)
        full = tok.chat(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise BadRow("the chat template does not render messages as a growing prefix")
        p = tok.encode(prompt[len(done) :], special=not ids)
        r = tok.encode(full[len(prompt) :], special=False)
        ids += p + r
        labels += [IGNORE] * len(p) + r
        done = full
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
        labels.append(tok.eos_id)
    return {"input_ids": ids, "labels": labels, "prompt_len": 0, "answers": []}


def make_example(row: Any, fmt: str, task: str, tok: Tokenizer, label_ids: dict[str, int]) -> Example:
    """Turn one row into a token example for ``task``.

    Raises:
        BadRow: the row is not a mapping, lacks a column, or the format does not suit the task.
    """
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with named fields, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if task == "classification":
        if fmt != "classification":
            raise BadRow(f"task classification needs format classification (text,label), not {fmt}")
        label = row.get("label")
        key = str(label)
        if key not in label_ids:
            raise BadRow(f"label {label!r} is not one of {sorted(label_ids)}")
        return {
            "input_ids": tok.encode(_str(row, "text"), special=True),
            "labels": label_ids[key],
            "prompt_len": 0,
            "answers": [],
        }
    source, target, answers = _source_target(row, fmt)
    if task == "seq2seq":
        return {
            "input_ids": tok.encode(source, special=True),
            "labels": tok.encode(target, special=True),
            "prompt_len": 0,
            "answers": answers,
        }
    if fmt == "text":
        ids = tok.encode(_str(row, "text"), special=True) + ([tok.eos_id] if tok.eos_id is not None else [])
        return {"input_ids": ids, "labels": list(ids), "prompt_len": 0, "answers": []}
    if fmt == "chat":
        return _chat(tok, row.get("messages"))
    return _causal(tok, source, (" " if fmt == "qa" else "") + target, answers)


def _source_target(row: dict[str, Any], fmt: str) -> tuple[str, str, list[str]]:
    """Prompt, response and reference answers of a row with a prompt."""
    if fmt == "instruction":
        extra = _str(row, "input", optional=True)
        out = _str(row, "output")
        return PROMPT.format(instruction=_str(row, "instruction"), input=extra + "\n\n" if extra else ""), out, [out]
    if fmt == "seq2seq":
        target = _str(row, "target")
        return _str(row, "source"), target, [target]
    if fmt == "qa":
        answers = _answers(row)
        return QA_PROMPT.format(context=_str(row, "context"), question=_str(row, "question")), answers[0], answers
    if fmt in ("text", "chat"):
        return "", "", []
    raise BadRow(f"format {fmt} cannot be used for this task")


@dataclass
class LoadedData:
    """Examples of one file plus what was skipped."""

    examples: list[Example]
    skipped: int = 0
    labels: list[str] = field(default_factory=list)


def infer_labels(path: str | Path) -> list[str]:
    """Sorted distinct ``label`` values (as strings) of a classification file; ints sort numerically."""
    values = {row.get("label") for _, row in read_rows(path) if isinstance(row, dict) and "label" in row}
    values.discard(None)
    return [
        str(v) for v in sorted(values, key=lambda v: (not isinstance(v, int), str(v) if not isinstance(v, int) else v))
    ]


def load_examples(
    path: str | Path,
    fmt: str,
    task: str,
    tok: Tokenizer,
    max_length: int,
    *,
    labels: list[str] | None = None,
    skip_bad_rows: bool = False,
    limit: int = 0,
    cache_dir: str | None = None,
) -> LoadedData:
    """Read, tokenise and truncate every row of ``path`` (from the cache when it is there).

    Args:
        path: the data file or ``datasets`` directory.
        fmt: a data format or ``auto``.
        task: ``causal_lm``, ``seq2seq`` or ``classification``.
        tok: the tokenizer.
        max_length: truncate ``input_ids`` (and causal labels) to this many tokens.
        labels: class names in id order (classification; inferred when empty).
        skip_bad_rows: count and skip malformed rows instead of raising.
        limit: read at most this many rows (0: all).
        cache_dir: where tokenised examples are cached (``None``: no cache).

    Raises:
        ConfigError: a malformed row (naming file and line) unless ``skip_bad_rows``.
    """
    p = Path(path)
    labels = list(labels or (infer_labels(p) if task == "classification" else []))
    cache = _cache_path(p, fmt, task, tok, max_length, labels, limit, cache_dir)
    if cache is not None and cache.exists():
        data = json.loads(cache.read_text())
        return LoadedData(data["examples"], data["skipped"], labels)
    label_ids = {name: i for i, name in enumerate(labels)}
    examples: list[Example] = []
    skipped = 0
    for line, row in read_rows(p):
        if limit and len(examples) >= limit:
            break
        try:
            ex = make_example(row, fmt, task, tok, label_ids)
        except BadRow as exc:
            if not skip_bad_rows:
                raise ConfigError(
                    f"{p}:{line}: malformed row: {exc}; fix the row or set data.skip_bad_rows=true to skip such rows"
                ) from None
            skipped += 1
            continue
        ex["input_ids"] = ex["input_ids"][:max_length]
        if isinstance(ex["labels"], list):
            ex["labels"] = ex["labels"][:max_length]
        examples.append(ex)
    if not examples:
        raise ConfigError(f"data file {str(p)!r} yielded no usable examples ({skipped} malformed rows skipped)")
    if cache is not None:
        # A temporary file of its own: every rank of a distributed run may write the same cache at once.
        write_text_atomic(cache, json.dumps({"examples": examples, "skipped": skipped}))
    return LoadedData(examples, skipped, labels)


def _cache_path(
    p: Path, fmt: str, task: str, tok: Tokenizer, max_length: int, labels: list[str], limit: int, cache_dir: str | None
) -> Path | None:
    if cache_dir is None:
        return None
    stat = p.stat()
    key = json.dumps(
        [str(p.resolve()), stat.st_mtime_ns, stat.st_size, fmt, task, tok.fingerprint, max_length, labels, limit, "v1"]
    )
    return Path(cache_dir) / f"{p.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
