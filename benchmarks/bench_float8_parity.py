"""Issue 5 parity bar: final training loss with float8 within 1% of the same run without it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_float8_parity.py \
        [--steps 800] [--recipes tensorwise,rowwise]

A recipe may carry a grad_output dtype: ``--recipes rowwise,rowwise:e5m2``.

``tiny_pretrain`` (the demo's base run) with and without ``float8.recipe=...`` (``torch._scaled_mm`` on
CPU), same seed and batches; prints the mean loss over the last 1 / 10 / 50 / 100 steps and the
difference to the run without float8 (paired: both runs see the same batches).
"""

import argparse
import tempfile
from pathlib import Path

from lowbit.recipes.runner import run_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--recipes", default="tensorwise,rowwise")
    a = p.parse_args()
    windows = (1, 10, 50, 100)
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["none", *a.recipes.split(",")]:
            recipe, _, go = name.partition(":")  # "rowwise:e5m2" = rowwise with grad_output in e5m2
            extra = [] if name == "none" else [f"float8.recipe={recipe}", "float8.emulate=false"]
            if go:
                extra.append(f"float8.grad_output_dtype={go}")
            run = run_recipe(
                "finetune_recipe",
                "tiny_pretrain",
                [
                    f"max_steps={a.steps}",
                    "checkpoint_every=0",
                    "progress_bar=false",
                    f"output_dir={Path(tmp) / name}",
                    *extra,
                ],
            )
            losses[name] = run.losses
    print(f"tiny_pretrain, {a.steps} steps; mean loss over the last k steps (difference vs no float8)")
    print("| float8 | " + " | ".join(f"last {k}" for k in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for name, ls in losses.items():
        cells = []
        for k in windows:
            m, ref = sum(ls[-k:]) / k, sum(losses["none"][-k:]) / k
            cells.append(f"{m:.4f} ({100 * (m - ref) / ref:+.2f}%)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
