"""``evaluate``: score a checkpoint (or an in-memory model) with lm-eval's real task pipeline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lowbit.eval.lm_eval_adapter import LowbitLM
from lowbit.eval.tasks import local_task_dir
from lowbit.models.checkpoint import load_checkpoint

AUTO = "auto"


def default_task_file() -> Path:
    """The generated hellaswag-format set (500 items, world seed 0), written once to a temp dir."""
    from lowbit.data import generate_hellaswag, write_jsonl

    path = Path(tempfile.gettempdir()) / "lowbit" / "hellaswag_local_seed0_500.jsonl"
    if not path.exists():
        write_jsonl(generate_hellaswag(500, seed=0), path)
    return path


def prepare_for_inference(model, meta: dict | None, scheme: str | None = AUTO, compile: bool = False,
                          *, group_size: int | None = None, dtype: torch.dtype | None = None):
    """Apply the inference quantization ``scheme`` (``"auto"``: the scheme recorded in the checkpoint
    by the QAT recipe, else none; ``None`` / ``"none"``: float) and optionally compile for CPU.

    ``group_size``: default the recorded QAT group size (``"auto"``) or the scheme's default;
    ``dtype``: see ``quantize_for_inference`` (``torch.float32`` reproduces fp32 fake quant exactly).
    Returns ``(model, scheme_used)``.
    """
    if scheme == AUTO:
        scheme = (meta or {}).get("qat_scheme")
        if group_size is None:
            group_size = (meta or {}).get("qat_group_size")
    if scheme in (None, "none"):
        scheme = None
        if dtype is not None:
            model = model.to(dtype)
    else:
        from lowbit.eval.quantize import quantize_for_inference

        model = quantize_for_inference(model, scheme, group_size=group_size, dtype=dtype)
    if compile:
        from lowbit.eval.compile import compile_for_cpu

        model = compile_for_cpu(model, dynamic=True)  # lm-eval batch widths vary
    return model, scheme


def evaluate(
    checkpoint: str | Path | None = None,
    *,
    task_file: str | Path | None = None,
    tasks: str = "hellaswag_local",
    limit: int | None = None,
    scheme: str | None = AUTO,
    compile: bool = False,
    model=None,
    tokenizer=None,
    batch_size: int = 32,
    log_samples: bool = False,
    output_dir: str | Path | None = None,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Run lm-eval on a checkpoint dir / run dir / HF dir, or on ``model`` + ``tokenizer``.

    ``tasks``: ``hellaswag_local`` (``task_file``, default the generated set) or ``hellaswag`` (lm-eval's
    own task from the local HF datasets cache, offline). Returns lm-eval's results dict, with
    ``results["lowbit"] = {"scheme", "compiled", "checkpoint"}``; writes ``results.json`` to
    ``output_dir`` if given. ``group_size`` / ``dtype``: see :func:`prepare_for_inference`.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    meta = None
    if model is None:
        if checkpoint is None:
            raise ValueError("evaluate needs a checkpoint or a model")
        model, tokenizer, meta = load_checkpoint(checkpoint)
    elif tokenizer is None:
        raise ValueError("evaluate(model=...) also needs tokenizer=...")
    model, scheme_used = prepare_for_inference(model.eval(), meta, scheme, compile, group_size=group_size,
                                               dtype=dtype)

    if tasks == "hellaswag_local":
        task_file = Path(task_file) if task_file else default_task_file()
        manager = TaskManager(include_path=str(local_task_dir(task_file)))
    elif tasks == "hellaswag":
        if task_file:
            raise ValueError("--task-file goes with --tasks hellaswag_local")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        manager = TaskManager()
    else:
        raise ValueError(f"unknown task {tasks!r}; expected 'hellaswag_local' or 'hellaswag'")

    lm = LowbitLM(model, tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[tasks], task_manager=manager, limit=limit, log_samples=log_samples,
            num_fewshot=0, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )
    except (ConnectionError, OSError) as e:
        if tasks == "hellaswag":
            raise FileNotFoundError(
                "the hellaswag dataset is not in the local HF datasets cache and lowbit never downloads: "
                "cache it once on a connected machine (datasets.load_dataset('Rowan/hellaswag')) or use "
                f"--tasks hellaswag_local --task-file FILE.jsonl ({e})"
            ) from e
        raise
    results["lowbit"] = {"scheme": scheme_used, "compiled": compile,
                         "checkpoint": str(meta["path"]) if meta else None}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "config", "lowbit") if k in results}
        (out / "results.json").write_text(json.dumps(keep, indent=1, default=str))
    return results


def acc_norm(results: dict, task: str = "hellaswag_local") -> float:
    """``acc_norm`` of ``task`` from an lm-eval results dict."""
    return results["results"][task]["acc_norm,none"]
