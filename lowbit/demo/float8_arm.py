"""The float8 arm of ``lowbit demo``: training parity of float8 with the same run in high precision.

Pretrain the tiny model from scratch three times with identical data, steps, seed and optimizer: without
float8, with ``float8.recipe=tensorwise`` and with ``float8.recipe=rowwise`` (``torch._scaled_mm``, which
runs on CPU: correct but not fast, so ``step_ms`` shows the CPU cost, not the H100 gain). The bar: the
float8 runs' final loss within 1% of the run without float8. Each checkpoint is then evaluated
(acc_norm) like any other: ``Float8Linear`` saves a plain ``nn.Linear`` state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.recipes.runner import run_recipe

RECIPES = ("tensorwise", "rowwise")
LAST_N = 10  # final loss = mean training loss of the last LAST_N steps (one batch is noisy)
PARITY = 0.01


def _final_loss(losses: list[float]) -> float:
    tail = losses[-LAST_N:]
    return sum(tail) / len(tail)


def _train(out: Path, overrides: list[str]) -> dict:
    r = run_recipe("finetune_recipe", "tiny_pretrain", [*overrides, f"output_dir={out}"])
    summary = json.loads((Path(r.output_dir) / "summary.json").read_text())
    return {
        "run": Path(r.output_dir),
        "final_loss": _final_loss(r.losses),
        "step_ms": summary.get("mean_step_ms"),
    }


def _acc(run: Path, eval_file: Path, limit: int | None) -> float:
    from lowbit.eval import acc_norm, evaluate

    return float(acc_norm(evaluate(run, task_file=eval_file, scheme=None, limit=limit)))


def run_float8_arm(
    workdir: Path,
    eval_file: Path,
    base_overrides: list[str],
    *,
    recipes: tuple[str, ...] = RECIPES,
    emulate: bool = False,
    limit: int | None = None,
) -> dict:
    """Train without and with float8; returns ``{"rows": [...], "markdown": str, "parity": bool}``.

    Args:
        workdir: the runs go to ``workdir/no_float8`` and ``workdir/float8_<recipe>``.
        eval_file: hellaswag-format jsonl evaluated with ``lowbit.eval.evaluate``.
        base_overrides: ``key=value`` overrides of ``tiny_pretrain`` applied to every run.
        recipes: float8 recipes to train with.
        emulate: ``float8.emulate`` (plain matmuls instead of ``torch._scaled_mm``).
        limit: evaluate only the first ``limit`` items (None: all).

    Each row: ``name, recipe, final_loss`` (mean of the last 10 steps), ``loss_delta`` (relative to the
    run without float8), ``within_1pct``, ``acc_norm`` (in [0, 1]) and ``step_ms`` (mean steady step).
    """
    workdir = Path(workdir)
    runs = [("no float8", None, _train(workdir / "no_float8", [*base_overrides, "float8=null"]))]
    for recipe in recipes:
        f8 = [f"float8.recipe={recipe}", f"float8.emulate={str(emulate).lower()}"]
        runs.append(
            (f"float8 {recipe}", recipe, _train(workdir / f"float8_{recipe}", [*base_overrides, *f8]))
        )

    base_loss = runs[0][2]["final_loss"]
    rows = []
    for name, recipe, res in runs:
        delta = (res["final_loss"] - base_loss) / base_loss
        rows.append({
            "name": name, "recipe": recipe, "final_loss": res["final_loss"], "loss_delta": delta,
            "within_1pct": abs(delta) <= PARITY, "acc_norm": _acc(res["run"], eval_file, limit),
            "step_ms": res["step_ms"],
        })
    lines = [
        f"| run | final loss (mean of last {LAST_N} steps) | vs no float8 | within 1% | acc_norm | step ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = "-" if r["step_ms"] is None else f"{r['step_ms']:.0f}"
        lines.append(f"| {r['name']} | {r['final_loss']:.4f} | {100 * r['loss_delta']:+.2f}% | "
                     f"{'yes' if r['within_1pct'] else 'NO'} | {100 * r['acc_norm']:.2f} | {step} |")
    return {"rows": rows, "markdown": "\n".join(lines), "parity": all(r["within_1pct"] for r in rows)}
