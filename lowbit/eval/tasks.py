"""lm-eval tasks over local files.

``hellaswag_local`` *includes* lm-eval's ``hellaswag.yaml`` (same ``process_docs``, prompt, ``acc`` and
``acc_norm``) and only swaps the dataset for a local jsonl file. ``perplexity_local`` is a
``loglikelihood_rolling`` task over a local jsonl of documents (``text`` field) reporting word and byte
perplexity and bits per byte, as lm-eval's wikitext task does. Any other task name is lm-eval's own,
read from the user's local HF datasets cache (offline).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import lm_eval.tasks

from lowbit.data.loaders import read_jsonl

HELLASWAG_YAML = Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml"
HELLASWAG_KEYS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def validate_hellaswag_file(path: str | Path) -> int:
    """Check every line of a hellaswag-format jsonl file; returns the number of items.

    Errors name the file and line: malformed JSON, missing keys, endings that are not a list of
    strings, or a label that is not an index into the endings.
    """
    rows = read_jsonl(path, required=HELLASWAG_KEYS)
    if not rows:
        raise ValueError(f"{path}: no items")
    with open(path, encoding="utf-8") as f:
        linenos = [i for i, line in enumerate(f, start=1) if line.strip()]
    for lineno, row in zip(linenos, rows):
        endings = row["endings"]
        if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
            raise ValueError(f"{path}:{lineno}: 'endings' must be a non-empty list of strings")
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{lineno}: label {row['label']!r} is not an integer") from None
        if not 0 <= label < len(endings):
            raise ValueError(f"{path}:{lineno}: label {label} out of range for {len(endings)} endings")
    return len(rows)


def local_task_dir(task_file: str | Path, name: str = "hellaswag_local") -> Path:
    """A directory with one task YAML (``name``) for ``task_file``; pass it as lm-eval's include_path."""
    task_file = Path(task_file).resolve()
    validate_hellaswag_file(task_file)
    d = Path(tempfile.mkdtemp(prefix="lowbit-tasks-"))
    (d / f"{name}.yaml").write_text(
        f"include: {HELLASWAG_YAML}\n"
        f"task: {name}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    validation: {task_file}\n"
        "training_split: null\n"
        "validation_split: validation\n"
    )
    return d


PERPLEXITY_TASK = "perplexity_local"
CLOZE_SIZE = 300


def perplexity_task_dir(text_file: str | Path, name: str = PERPLEXITY_TASK) -> Path:
    """A directory with one ``loglikelihood_rolling`` task YAML over ``text_file`` (jsonl, ``text`` field)."""
    text_file = Path(text_file).resolve()
    rows = read_jsonl(text_file, required=("text",))
    if not rows:
        raise ValueError(f"{text_file}: no documents")
    d = Path(tempfile.mkdtemp(prefix="lowbit-tasks-"))
    (d / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {text_file}\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return d


def _cached(name: str, build) -> Path:
    """``build()``'s jsonl rows written once under the temp dir, keyed by their content."""
    rows = build()
    key = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "lowbit" / f"{name}-{key}.jsonl"
    if not path.exists():
        from lowbit.data import write_jsonl

        write_jsonl(rows, path)
    return path


def documents(source: str | Path, max_chars: int = 4000) -> list[str]:
    """Documents of about ``max_chars`` (consecutive paragraphs joined) from a text source."""
    from lowbit.data.real_text import load_source

    docs, current = [], []
    for p in load_source(source):
        current.append(p)
        if sum(len(c) for c in current) >= max_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def text_file(source: str | Path = "python-docs", max_docs: int | None = None) -> Path:
    """A perplexity jsonl (``text`` per line): the documents of ``source``, the first ``max_docs``."""
    return _cached(f"text-{Path(str(source)).name}-{max_docs}",
                   lambda: [{"text": t} for t in documents(source)[:max_docs]])


def cloze_file(source: str | Path = "python-docs", num_items: int = CLOZE_SIZE, seed: int = 0) -> Path:
    """A hellaswag-format jsonl of ``num_items`` cloze items built from ``source`` (see
    :mod:`lowbit.data.cloze`)."""
    from lowbit.data.cloze import cloze_items
    from lowbit.data.real_text import load_source

    label = "Python documentation" if str(source) == "python-docs" else "Text"
    return _cached(f"cloze-{Path(str(source)).name}-{num_items}-{seed}",
                   lambda: cloze_items(load_source(source), num_items, seed=seed, label=label,
                                       source=str(source)))
