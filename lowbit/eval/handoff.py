"""Does the hand-off lose anything? Per-item lm-eval choices of a fake-quant model vs its deployed model.

The QAT model (``lowbit.qat.prepare``, fake quant on) and the model ``lowbit eval`` deploys
(``quantize_for_inference``: torchao's CPU inference configs) are evaluated on the same items; the
result says, per item, whether both pick the same ending (hellaswag's ``acc_norm`` choice: the highest
log-likelihood per byte of the ending), and how far apart their log-likelihoods are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit import qat
from lowbit.eval.evaluate import acc_norm, evaluate
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models.checkpoint import load_checkpoint


def _choices(results: dict, task: str) -> dict[int, tuple[int, list[float]]]:
    """``doc_id -> (acc_norm choice, log-likelihoods)`` from lm-eval samples."""
    out = {}
    for s in results["samples"][task]:
        lls = [float(ll) for ll, _ in s["filtered_resps"]]
        lengths = [len(cont.encode()) for _, cont in s["arguments"]]
        choice = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        out[s["doc_id"]] = (choice, lls)
    return out


def compare_handoff(checkpoint: str | Path, scheme: str, *, group_size: int | None = None,
                    dtype: torch.dtype | None = None, task_file: str | Path | None = None,
                    limit: int | None = None) -> dict:
    """Evaluate ``checkpoint`` fake-quantized and deployed with ``scheme``; compare per item.

    ``dtype``: the deployed model's dtype (default: ``quantize_for_inference``'s, bf16 for the int4 /
    int8 weight-only kernels); the fake-quant model runs in the same dtype.

    Returns ``{"items", "same_choice", "max_abs_ll_diff", "acc_norm_fake_quant", "acc_norm_deployed",
    "dtype"}``.
    """
    task = "hellaswag_local"
    deployed, tokenizer, _ = load_checkpoint(checkpoint)
    deployed = quantize_for_inference(deployed, scheme, group_size=group_size, dtype=dtype)
    dtype = next(p.dtype for p in deployed.parameters() if p.is_floating_point())
    fake, _, _ = load_checkpoint(checkpoint)
    fake = qat.prepare(fake.to(dtype), scheme, group_size=group_size)

    runs = {}
    for name, model in (("fake_quant", fake), ("deployed", deployed)):
        runs[name] = evaluate(model=model, tokenizer=tokenizer, task_file=task_file, scheme=None, limit=limit,
                              log_samples=True)
    a, b = _choices(runs["fake_quant"], task), _choices(runs["deployed"], task)
    same = sum(a[d][0] == b[d][0] for d in a)
    diff = max(max(abs(x - y) for x, y in zip(a[d][1], b[d][1])) for d in a)
    return {"items": len(a), "same_choice": same, "max_abs_ll_diff": diff, "dtype": str(dtype),
            "acc_norm_fake_quant": acc_norm(runs["fake_quant"], task),
            "acc_norm_deployed": acc_norm(runs["deployed"], task)}
