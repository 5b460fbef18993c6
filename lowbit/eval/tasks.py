"""lm-eval tasks: lm-eval's own hellaswag config, pointed at a local hellaswag-format jsonl file.

``hellaswag_local`` *includes* lm-eval's ``hellaswag.yaml`` (same ``process_docs``, prompt, ``acc`` and
``acc_norm``) and only swaps the dataset for a local jsonl file. ``hellaswag`` is lm-eval's task
unchanged, read from the user's local HF datasets cache (offline).
"""

from __future__ import annotations

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
