"""Issue 4 precondition: does post-training quantization cost the tiny model accuracy in any setting?

    .venv/bin/python benchmarks/bench_qat_ptq_sensitivity.py [--items 300] [--settings t300,h256,...]

The recovery bar ((QAT - PTQ) / (float - PTQ) >= 90%) needs a setting where PTQ loses >= 5 points of
acc_norm. For each setting this pretrains a base with ``finetune_recipe`` and evaluates it float and
PTQ'd (``quantize_for_inference``, the default bf16 deployment) on generated items of the same world.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lowbit.data import generate_hellaswag, make_world, write_jsonl
from lowbit.eval import acc_norm, evaluate
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models.checkpoint import load_checkpoint
from lowbit.recipes.runner import run_recipe

# name: (overrides of tiny_pretrain, activities in the world)
SETTINGS = {
    "t200": (["max_steps=200"], 64),                      # the demo base, undertrained
    "t300": (["max_steps=300"], 64),                      # mid-transition: accuracy below 100%
    "u400": (["max_steps=400", "model.overrides.tie_word_embeddings=false"], 64),  # int4 output head too
    "h256": (["max_steps=600", "data.num_docs=8192", "data.num_activities=256"], 256),  # 4x the world
    "d64l1": (["max_steps=400", "model.overrides.embed_dim=64", "model.overrides.intermediate_dim=192",
               "model.overrides.num_layers=1"], 64),    # a narrower, shallower model
}
PTQ = [("8da4w", 32), ("8da4w", 128), ("4w", 128), ("8w", None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--settings", default=",".join(SETTINGS))
    a = p.parse_args()
    print(
        "| setting | final loss | float | "
        + " | ".join(f"PTQ {s} g{g}" for s, g in PTQ)
        + " | worst PTQ loss (points) |"
    )
    print("|---|---|---|" + "---|" * len(PTQ) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.settings.split(","):
            overrides, activities = SETTINGS[name]
            task = Path(tmp) / f"task_{activities}.jsonl"
            write_jsonl(generate_hellaswag(a.items, 0, make_world(0, activities)), task)
            run = run_recipe("finetune_recipe", "tiny_pretrain", [
                *overrides, "progress_bar=false", "checkpoint_every=0", f"output_dir={Path(tmp) / name}"])
            accs = []
            for scheme, group in [(None, None), *PTQ]:
                model, tok, _ = load_checkpoint(run.output_dir)
                if scheme:
                    model = quantize_for_inference(model, scheme, group_size=group)
                res = evaluate(model=model, tokenizer=tok, task_file=task, scheme=None)
                accs.append(acc_norm(res))
            worst = 100 * (accs[0] - min(accs[1:]))
            print(
                f"| {name} | {run.losses[-1]:.3f} | "
                + " | ".join(f"{x:.4f}" for x in accs)
                + f" | {worst:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
