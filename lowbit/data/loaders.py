"""Training text: lowbit's generated corpus or a user's own files, tokenized and packed.

A user's ``.txt`` files (one document per line) and ``.jsonl`` / ``.json`` files (a ``text`` field per
object) load through HF ``datasets``. Every file is checked first, so that an empty file, a binary
(not UTF-8) one, a malformed JSON line or a text field that is not a string is reported as a
:class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


class DataError(ValueError):
    """A data file that is empty, not UTF-8 text, or malformed; the message names the file and line."""


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; :class:`DataError` names the first line that is not
    text."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}): a binary file?") from None
            if "\x00" in line:
                raise DataError(f"{path}:{lineno}: not text (NUL byte at column {line.index(chr(0)) + 1}): "
                                "a binary file?")
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _check_text_field(where: str, row: dict, field: str) -> None:
    value = row[field]
    if not isinstance(value, str):
        what = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{where}: field {field!r} is {what}, expected a string")


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               text_fields: tuple[str, ...] = ()) -> list[dict]:
    """Parse a jsonl file; :class:`DataError` names the path and the 1-based line number.

    Blank lines are skipped; a file without any object is an error. Each object must contain every
    key in ``required``, and the keys in ``text_fields`` must hold strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file not found: {path}")
    rows = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing key(s) {missing}")
        for field in text_fields:
            _check_text_field(f"{path}:{lineno}", row, field)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty (no JSON objects)")
    return rows


def check_data_file(path: str | Path, text_field: str = "text") -> None:
    """Raise :class:`DataError` naming the file (and line) unless ``path`` holds non-empty UTF-8 text:
    documents one per line (``.txt``), or objects whose ``text_field`` is a string (``.jsonl``, or
    ``.json``: an array of objects or JSON lines)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not sum(bool(line.strip()) for _, line in _text_lines(path)):  # reads (checks) every line
            raise DataError(f"{path}: empty (no non-blank lines)")
        return
    if path.suffix == ".json":
        text = "".join(line for _, line in _text_lines(path))
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None  # JSON lines, checked line by line below
        if isinstance(records, list):
            if not records:
                raise DataError(f"{path}: empty (a JSON array without records)")
            for i, row in enumerate(records, start=1):
                if not isinstance(row, dict) or text_field not in row:
                    raise DataError(f"{path}: record {i}: expected an object with a {text_field!r} field")
                _check_text_field(f"{path}: record {i}", row, text_field)
            return
    read_jsonl(path, required=(text_field,), text_fields=(text_field,))


def _data_files(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(f"no .txt / .jsonl / .json files under {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    return [str(path)]


def load_texts(source: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a user's file or directory, through HF ``datasets`` (offline, local files only)."""
    import datasets

    files = _data_files(Path(source))
    kinds = {"json" if f.endswith((".jsonl", ".json")) else "text" for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{source}: mixes text and json files; use one kind")
    kind = kinds.pop()
    for f in files:
        check_data_file(f, text_field)
    ds = datasets.load_dataset(kind, data_files=files, split="train")
    column = text_field if kind == "json" else "text"
    if column not in ds.column_names:
        raise DataError(f"{source}: no {column!r} field (found {ds.column_names})")
    texts = [t for t in ds[column] if t and t.strip()]
    if not texts:
        raise DataError(f"{source}: no non-blank text")
    return texts


def pack_documents(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize documents (BOS ... EOS each), concatenate, and cut into rows of ``seq_len + 1`` tokens.

    Returns an int64 tensor ``[num_rows, seq_len + 1]``; row ``r`` gives inputs ``[:-1]`` and labels
    ``[1:]``. The ragged tail is dropped.
    """
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_bos=True, add_eos=True))
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens of data: fewer than one sequence of {seq_len + 1}")
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)
