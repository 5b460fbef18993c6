"""The QAT arm of the demo: the published QAT experiment at small scale.

From a pretrained tiny base, fine-tune twice with identical data, steps, seed and optimizer: once plainly
(``finetune_recipe``) and once with QAT (``qat_recipe``) per scheme. Then evaluate acc_norm of

- float: the plain fine-tune, unquantized,
- PTQ:   the plain fine-tune quantized for CPU inference with the scheme's torchao config,
- QAT:   the QAT fine-tune converted with the same config,

and report the recovered fraction ``(QAT - PTQ) / (float - PTQ)`` (published: 96% for 8da4w on Llama3-8B).
"""

from __future__ import annotations

from pathlib import Path

from lowbit.recipes.runner import run_recipe

SCHEMES = ("8da4w", "4w")

# Fine-tune settings shared by both arms (on top of tiny_pretrain + the caller's base_overrides).
FINETUNE_OVERRIDES = [
    "max_steps=150",
    "optimizer.lr=5.0e-4",
    "optimizer.weight_decay=0.0",
    "lr_scheduler.num_warmup_steps=10",
    "seed=1",
    "keep_last=1",
    "progress_bar=false",
]


def _finetune(recipe: str, base_checkpoint: Path, out: Path, overrides: list[str]) -> Path:
    args = [*overrides, f"base_checkpoint={base_checkpoint}", f"output_dir={out}", "checkpoint_every=0"]
    r = run_recipe(recipe, "tiny_pretrain", args)
    return r.output_dir


def _acc(checkpoint: Path, eval_file: Path, scheme: str | None, limit: int | None) -> float:
    from lowbit.eval import acc_norm, evaluate

    return float(acc_norm(evaluate(checkpoint, task_file=eval_file, scheme=scheme, limit=limit)))


def recovered(float_acc: float, ptq_acc: float, qat_acc: float) -> float | None:
    """``(QAT - PTQ) / (float - PTQ)``; None when PTQ lost nothing (the fraction is undefined)."""
    lost = float_acc - ptq_acc
    return None if lost <= 0 else (qat_acc - ptq_acc) / lost


def run_qat_arm(
    base_checkpoint: Path,
    workdir: Path,
    eval_file: Path,
    base_overrides: list[str],
    *,
    schemes: tuple[str, ...] = SCHEMES,
    limit: int | None = None,
) -> dict:
    """Run the QAT arm; returns ``{"rows": [...], "markdown": str, "float_acc_norm": float}``.

    Args:
        base_checkpoint: the pretrained tiny base (a lowbit checkpoint / run dir).
        workdir: where the two (or more) fine-tunes write their runs.
        eval_file: hellaswag-format jsonl evaluated with ``lowbit.eval.evaluate``.
        base_overrides: ``key=value`` overrides applied to both fine-tunes (after ours, so they win).
        schemes: QAT schemes to compare (each gets its own QAT fine-tune).
        limit: evaluate only the first ``limit`` items (None: all).

    Each row: ``scheme, float, ptq, qat, recovered`` (acc_norm in [0, 1]; recovered may be None).
    """
    workdir = Path(workdir)
    common = [*FINETUNE_OVERRIDES, *base_overrides]
    plain = _finetune("finetune_recipe", base_checkpoint, workdir / "plain_finetune", common)
    float_acc = _acc(plain, eval_file, None, limit)
    rows = []
    for scheme in schemes:
        qat_run = _finetune(
            "qat_recipe", base_checkpoint, workdir / f"qat_{scheme}", [*common, f"qat.scheme={scheme}"]
        )
        ptq_acc = _acc(plain, eval_file, scheme, limit)
        qat_acc = _acc(qat_run, eval_file, scheme, limit)
        rows.append({"scheme": scheme, "float": float_acc, "ptq": ptq_acc, "qat": qat_acc,
                     "recovered": recovered(float_acc, ptq_acc, qat_acc)})
    lines = [
        "| scheme | float acc_norm | PTQ acc_norm | QAT acc_norm | PTQ loss (points) | recovered |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = "n/a (PTQ lost nothing)" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
        lines.append(
            f"| {r['scheme']} | {100 * r['float']:.2f} | {100 * r['ptq']:.2f} | {100 * r['qat']:.2f} | "
            f"{100 * (r['float'] - r['ptq']):.2f} | {rec} |"
        )
    return {"rows": rows, "markdown": "\n".join(lines), "float_acc_norm": float_acc}
