"""``evaluate``: score a checkpoint (or an in-memory model) with lm-eval's real task pipeline."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from lowbit.eval.lm_eval_adapter import LowbitLM
from lowbit.eval.tasks import PERPLEXITY_TASK, cloze_file, local_task_dir, perplexity_task_dir, text_file
from lowbit.models.checkpoint import load_checkpoint

AUTO = "auto"


def default_task_file(meta: dict | None = None) -> Path:
    """The hellaswag-format items a checkpoint is scored on by default: the generated set (500 items,
    world seed 0) for a model trained on lowbit's generated corpus, else 300 cloze items built from
    Python's documentation (real English, held out from the training text)."""
    from lowbit.data import generate_hellaswag, write_jsonl

    source = ((meta or {}).get("config") or {}).get("data", {}).get("source")
    if source != "generated":
        return cloze_file("python-docs")
    path = Path(tempfile.gettempdir()) / "lowbit" / "hellaswag_local_seed0_500.jsonl"
    if not path.exists():
        write_jsonl(generate_hellaswag(500, seed=0), path)
    return path


def task_manager(tasks: list[str], task_file: str | Path | None, text: str | Path | None, meta: dict | None):
    """An lm-eval ``TaskManager`` that knows ``tasks``: the local ones (``hellaswag_local`` over
    ``task_file``, a jsonl or a text source name; ``perplexity_local`` over ``text``, a jsonl of
    documents or a text source name) and any task of the user's lm-eval install (offline)."""
    from lm_eval.tasks import TaskManager

    include = []
    if "hellaswag_local" in tasks:
        if task_file is None:
            task_file = default_task_file(meta)
        elif not str(task_file).endswith(".jsonl"):
            task_file = cloze_file(task_file)
        include.append(str(local_task_dir(task_file)))
    elif task_file:
        raise ValueError("--task-file goes with --tasks hellaswag_local")
    if PERPLEXITY_TASK in tasks:
        path = text_file(text or "python-docs") if text is None or not str(text).endswith(".jsonl") else text
        include.append(str(perplexity_task_dir(path)))
    elif text:
        raise ValueError(f"--text goes with --tasks {PERPLEXITY_TASK}")
    others = [t for t in tasks if t not in ("hellaswag_local", PERPLEXITY_TASK)]
    if others:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in others if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ValueError(f"unknown lm-eval task(s) {unknown}; close matches: {hints}; local tasks: "
                         f"['hellaswag_local', '{PERPLEXITY_TASK}']")
    return manager


def prepare_for_inference(model, meta: dict | None, scheme: str | None = AUTO, compile: bool = False,
                          *, group_size: int | None = None, dtype: torch.dtype | None = None):
    """Deploy ``model`` for CPU inference (:func:`lowbit.eval.deploy`) and optionally compile it.

    ``scheme``: ``"auto"`` deploys what the checkpoint's ``meta`` records (``qat_scheme``,
    ``qat_group_size``, ``qat_embeddings``; nothing recorded: float); the recorded scheme's name keeps
    the recorded group size and embeddings; another name is PTQ with that scheme (group size: see
    ``deploy``); ``None`` / ``"none"``: float. ``group_size`` / ``dtype`` override. Returns
    ``(model, scheme_used)`` (``scheme_used``: the scheme name, None for float).
    """
    from lowbit.eval.deployment import as_is, deploy, deployment_of

    recorded = (meta or {}).get("qat_scheme")
    if scheme in (None, "none"):  # run the model as it is (float, or already deployed / fake-quantized)
        model = as_is(model, dtype)
    else:
        if scheme == AUTO or scheme == recorded:
            spec = {k: (meta or {}).get(k) for k in ("qat_scheme", "qat_group_size", "qat_embeddings",
                                                       "qat_qparams")}
        else:
            spec = scheme
        model = deploy(model, spec, group_size=group_size, dtype=dtype)
    used = deployment_of(model).scheme
    if compile:
        from lowbit.eval.compile import compile_for_cpu

        model = compile_for_cpu(model, dynamic=True)  # lm-eval batch widths vary
    return model, (None if used == "none" or scheme in (None, "none") else used.split("(")[0])


def evaluate(
    checkpoint: str | Path | None = None,
    *,
    task_file: str | Path | None = None,
    tasks: str | list[str] = "hellaswag_local",
    text: str | Path | None = None,
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
    kl_reference: str | Path | None = None,
    kl_windows: int = 32,
    kl_window: int = 512,
) -> dict:
    """Run lm-eval on a checkpoint dir / run dir / HF dir, or on ``model`` + ``tokenizer``.

    ``tasks`` (a list or comma-separated): ``hellaswag_local`` (``task_file``: a hellaswag-format jsonl,
    or a text source such as ``python-docs`` to build cloze items from; default :func:`default_task_file`),
    ``perplexity_local`` (``text``: a jsonl of documents or a text source; default Python's documentation),
    or any lm-eval task in the local HF datasets cache (offline). Returns lm-eval's results dict, with
    ``results["lowbit"] = {"scheme", "compiled", "checkpoint"}``; writes ``results.json`` to
    ``output_dir`` if given. ``group_size`` / ``dtype``: see :func:`prepare_for_inference`.
    """
    meta = None
    if model is None:
        if checkpoint is None:
            raise ValueError("evaluate needs a checkpoint or a model")
        model, tokenizer, meta = load_checkpoint(checkpoint)
    elif tokenizer is None:
        raise ValueError("evaluate(model=...) also needs tokenizer=...")
    model, scheme_used = prepare_for_inference(model.eval(), meta, scheme, compile, group_size=group_size,
                                               dtype=dtype)

    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    tasks = [t for t in tasks if t != "none"]
    results = {"results": {}}
    if kl_reference is not None:
        results["kl"] = divergence_from(model, tokenizer, kl_reference, text, kl_windows, kl_window)
    if tasks:
        results = {**run_lm_eval(model, tokenizer, tasks, task_file, text, meta, limit, log_samples,
                                 batch_size),
                   **({"kl": results["kl"]} if "kl" in results else {})}
    from lowbit.eval.deployment import deployment_of

    dep = deployment_of(model)
    results["lowbit"] = {"scheme": scheme_used, "compiled": compile,
                         "checkpoint": str(meta["path"]) if meta else None, "deployed": dep.label,
                         "quantized_embeddings": dep.quantized_embeddings, "dtype": str(dep.dtype)}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "config", "lowbit", "kl")
                if k in results}
        (out / "results.json").write_text(json.dumps(keep, indent=1, default=str))
    return results


def divergence_from(model, tokenizer, reference, text, windows: int, window: int) -> dict:
    """KL divergence / top-1 agreement of ``model`` from the checkpoint ``reference`` on ``text``."""
    from lowbit.eval.divergence import compare_to_reference, token_windows
    from lowbit.eval.tasks import documents
    from lowbit.models.tokenizer import vocab_size_of

    ref_model, ref_tok, _ = load_checkpoint(reference)
    if vocab_size_of(ref_tok) != vocab_size_of(tokenizer):
        raise ValueError(f"--kl-reference {reference}: its tokenizer has {vocab_size_of(ref_tok)} tokens, "
                         f"the evaluated model's {vocab_size_of(tokenizer)}; KL needs the same vocabulary")
    source = text or "python-docs"
    if str(source).endswith(".jsonl"):
        from lowbit.data.loaders import read_jsonl

        docs = [r["text"] for r in read_jsonl(source, required=("text",))]
    else:
        docs = documents(source)
    x = token_windows(tokenizer, docs, window, windows)
    stats = compare_to_reference(model, ref_model.eval(), x)
    return {**stats, "reference": str(reference), "text": str(source), "window": window}


def score_against_float(model, tokenizer, reference_logits: torch.Tensor, windows: torch.Tensor,
                        task_file: Path | None) -> dict:
    """One arm's quality: perplexity, KL divergence from the float model and top-1 agreement (with standard
    errors) on ``windows`` ``(N, L)`` int64 whose float logits are ``reference_logits`` ``(N, L, V)``; with
    ``task_file``, cloze ``acc_norm`` (its binomial standard error and the item count) through lm-eval."""
    from lowbit.eval.divergence import compare_to_reference

    with torch.no_grad():
        kl = compare_to_reference(model, reference_logits, windows)
    row = {k: kl[k] for k in ("ppl", "kl_mean", "kl_stderr", "top1_agreement", "top1_stderr")}
    if task_file is not None:
        res = evaluate(model=model, tokenizer=tokenizer, task_file=task_file, scheme="none")
        n = int(res.get("n-samples", {}).get("hellaswag_local", {}).get("effective", 0))
        acc = acc_norm(res)
        row.update(acc_norm=acc, acc_norm_stderr=math.sqrt(acc * (1 - acc) / n) if n else None, items=n)
    return row


def run_lm_eval(model, tokenizer, tasks, task_file, text, meta, limit, log_samples, batch_size) -> dict:
    """lm-eval's ``simple_evaluate`` over ``tasks`` with :class:`LowbitLM`, deterministic, zero-shot."""
    import lm_eval

    manager = task_manager(tasks, task_file, text, meta)
    lm = LowbitLM(model, tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples,
            num_fewshot=0, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )
    except (ConnectionError, OSError) as e:
        remote = [t for t in tasks if t not in ("hellaswag_local", PERPLEXITY_TASK)]
        if remote:
            raise FileNotFoundError(
                f"the data of {remote} is not in the local HF datasets cache and lowbit never downloads: "
                "cache it once on a connected machine (e.g. datasets.load_dataset('Rowan/hellaswag')) or use "
                f"--tasks hellaswag_local --task-file FILE.jsonl ({e})"
            ) from e
        raise
    return results


def acc_norm(results: dict, task: str = "hellaswag_local") -> float:
    """``acc_norm`` of ``task`` from an lm-eval results dict."""
    return results["results"][task]["acc_norm,none"]
