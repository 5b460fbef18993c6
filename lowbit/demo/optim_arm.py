"""The optimizer arm of ``lowbit demo``: pretrain the tiny model with fp32 AdamW and the low-bit
AdamW variants (same steps, data, seed, hyper-parameters), then compare final loss, eval
accuracy, optimizer state memory and step time side by side."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from lowbit.recipes.runner import run_recipe

OPTIMIZERS = {
    "AdamW (fp32)": "torch.optim.AdamW",
    "AdamW8bit": "lowbit.optim.AdamW8bit",
    "AdamW4bit": "lowbit.optim.AdamW4bit",
}
FINAL_WINDOW = 20  # final_loss: mean training loss of the last steps (one batch is noisy)


def state_bytes_per_param(optimizer: torch.optim.Optimizer, params) -> float:
    """Bytes of optimizer state tensors per parameter element."""
    n = sum(p.numel() for p in params)
    total = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    return total / n


def optimizer_step_ms(optimizer: torch.optim.Optimizer, params, repeats: int = 10) -> float:
    """Median time of ``optimizer.step()`` on ``params`` with fixed random gradients (after the run)."""
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    optimizer.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return 1e3 * statistics.median(times)


def run_optim_arm(workdir: Path, eval_file: Path, base_overrides: list[str], *,
                  optimizers: dict[str, str] | None = None, limit: int | None = None) -> dict:
    """Pretrain ``tiny_pretrain`` once per optimizer and evaluate each run.

    Args:
        workdir: runs go to ``workdir/<optimizer>``.
        eval_file: hellaswag-format jsonl for ``lowbit.eval.evaluate``.
        base_overrides: ``key=value`` overrides shared by every run (e.g. ``max_steps=...``).
        optimizers: ``{name: component path}``; default fp32 AdamW, AdamW8bit, AdamW4bit.
        limit: evaluate only the first ``limit`` items.

    Returns ``{"rows": [...], "markdown": str}``; each row has ``name, final_loss`` (mean of the
    last 20 training losses), ``acc_norm, state_bytes_per_param, step_ms`` (mean training step,
    steady state) and ``optim_step_ms`` (median optimizer step alone) and ``loss_vs_adamw``.
    """
    from lowbit.eval import acc_norm, evaluate

    workdir = Path(workdir)
    rows = []
    for name, component in (optimizers or OPTIMIZERS).items():
        out = workdir / name.split(" ")[0].replace("(", "").lower()
        r = run_recipe("finetune_recipe", "tiny_pretrain",
                       [*base_overrides, f"output_dir={out}", f"optimizer._component_={component}"])
        params = [p for p in r.model.parameters() if p.requires_grad]
        res = evaluate(r.output_dir, task_file=eval_file, limit=limit)
        summary = json.loads(
            (Path(r.output_dir) / "summary.json").read_text()
        )  # written with the last checkpoint
        losses = r.losses[-FINAL_WINDOW:]
        rows.append({
            "name": name,
            "final_loss": sum(losses) / len(losses),
            "acc_norm": float(acc_norm(res)),
            "state_bytes_per_param": state_bytes_per_param(r.optimizer, params),
            "step_ms": summary["mean_step_ms"],
            "optim_step_ms": optimizer_step_ms(r.optimizer, params),
        })
    ref = rows[0]["final_loss"]
    for row in rows:
        row["loss_vs_adamw"] = row["final_loss"] / ref - 1.0
    lines = [
        f"| optimizer | final loss (mean last {FINAL_WINDOW}) | vs {rows[0]['name']} | acc_norm | "
        "state B/param | train step ms | optimizer step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['final_loss']:.4f} | {100 * row['loss_vs_adamw']:+.2f}% | "
            f"{100 * row['acc_norm']:.2f} | {row['state_bytes_per_param']:.3f} | "
            f"{row['step_ms']:.1f} | {row['optim_step_ms']:.2f} |"
        )
    return {"rows": rows, "markdown": "\n".join(lines)}
