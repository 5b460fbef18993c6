"""Training text: lowbit's generated corpus or a user's own files, tokenized and packed.

A user's ``.txt`` files (one document per line) and ``.jsonl`` / ``.json`` files (a ``text`` field per
object) load through HF ``datasets``; jsonl is validated first so a malformed line is reported with
its line number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Parse a jsonl file; errors name the path and the 1-based line number.

    Blank lines are skipped. Each object must contain every key in ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing}")
            rows.append(row)
    return rows


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
    if kind == "json":
        for f in files:
            if f.endswith(".jsonl"):
                read_jsonl(f, required=(text_field,))
    ds = datasets.load_dataset(kind, data_files=files, split="train")
    column = text_field if kind == "json" else "text"
    if column not in ds.column_names:
        raise ValueError(f"{source}: no {column!r} field (found {ds.column_names})")
    return [t for t in ds[column] if t and t.strip()]


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
