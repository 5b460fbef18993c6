"""The demo (``lowbit demo``): pretrain the tiny preset offline, evaluate it with lm-eval, run each
feature's arm, and write one markdown report (plus PNG plots) next to the runs.

Arms (each in its own module, chosen with ``--arms``):
``optim`` (AdamW vs AdamW8bit / AdamW4bit), ``qat`` (float vs PTQ vs QAT), ``float8`` (loss parity),
and, opt-in, ``speed`` (CPU decode/prefill throughput per inference scheme).
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import platform
import time
import traceback
from pathlib import Path

import torch

from lowbit.data import generate_hellaswag, write_jsonl
from lowbit.eval import acc_norm, evaluate
from lowbit.models import num_params
from lowbit.models.checkpoint import load_checkpoint
from lowbit.recipes.runner import run_recipe

log = logging.getLogger("lowbit.demo")

ARMS = ("optim", "qat", "float8", "speed")
# `speed` compiles and times a 168M-parameter model once per scheme: opt-in, so that
# `make demo` stays within 10 minutes. `lowbit bench` measures the same on its own.
DEFAULT_ARMS = ("optim", "qat", "float8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _run_arm(name: str, out: Path, eval_file: Path, base_ckpt: Path, base_overrides: list[str]) -> dict:
    if name == "optim":
        return importlib.import_module("lowbit.demo.optim_arm").run_optim_arm(
            out / "optim", eval_file, base_overrides)
    if name == "qat":
        return importlib.import_module("lowbit.demo.qat_arm").run_qat_arm(
            base_ckpt, out / "qat", eval_file, base_overrides)
    if name == "float8":
        # tensorwise only: the emulated rowwise step is ~3.6x slower on CPU (its parity is benchmarked).
        return importlib.import_module("lowbit.demo.float8_arm").run_float8_arm(
            out / "float8", eval_file, base_overrides, recipes=("tensorwise",))
    if name == "speed":
        return importlib.import_module("lowbit.demo.speed_arm").run_speed_arm(
            "small_150m", ["8w", "4w", "8da4w"], out / "speed")
    raise ValueError(f"unknown demo arm {name!r}; known arms: {list(ARMS)}")


def run_demo(out: Path, *, steps: int | None = None, arm_steps: int = 120, arms: list[str] = DEFAULT_ARMS,
             num_items: int = 500, overrides: list[str] = ()) -> dict:
    """Run the demo into ``out``; returns a summary dict and writes ``out/report.md``.

    The base run pretrains for ``steps`` (default: the config's); each arm's training runs use
    ``arm_steps`` so that all arms fit in a few minutes on 2 cores. ``overrides`` (``key=value`` for
    ``tiny_pretrain``) apply to every run, base and arms (e.g. a smaller model for a quick check).
    """
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    eval_file = write_jsonl(generate_hellaswag(num_items, seed=0), out / "data" / "hellaswag_local.jsonl")
    # overwrite=true: a demo re-run replaces the runs of the previous one in `out`
    arm_overrides = [*overrides, f"max_steps={arm_steps}", "checkpoint_every=0", "overwrite=true"]

    log.info("pretraining the tiny preset on the generated corpus")
    base_args = [f"max_steps={steps}"] if steps else []
    base = run_recipe(
        "finetune_recipe", "tiny_pretrain",
        [*overrides, *base_args, f"output_dir={out / 'base'}", "overwrite=true"],
    )
    summary = json.loads((base.output_dir / "summary.json").read_text())
    base_ckpt = Path(summary["checkpoint"])
    model, _, meta = load_checkpoint(base_ckpt)
    res = evaluate(base_ckpt, task_file=eval_file, output_dir=out / "base" / "eval")
    base_row = {
        "preset": meta["model_args"], "params": num_params(model), "train_tokens": summary["train_tokens"],
        "train_seconds": summary["train_seconds"], "final_loss": summary["final_loss"],
        "acc": res["results"]["hellaswag_local"]["acc,none"], "acc_norm": acc_norm(res),
        "items": num_items,
    }

    sections, failures, accuracy = [], [], {"base (fp32 AdamW)": base_row["acc_norm"]}
    for name in arms:
        t0 = time.perf_counter()
        try:
            arm = _run_arm(name, out, eval_file, base_ckpt, arm_overrides)
        except Exception as e:  # report and continue: one broken arm must not hide the others
            log.error("demo arm %s failed: %s", name, e)
            failures.append(name)
            sections.append(
                f"## {name}\n\nFAILED: `{type(e).__name__}: {e}`\n\n```\n{traceback.format_exc()}```\n"
            )
            continue
        plot = f"\n\n![{name}]({Path(arm['plot']).relative_to(out)})" if arm.get("plot") else ""
        sections.append(f"## {name}\n\n{arm['markdown']}{plot}\n\n_{time.perf_counter() - t0:.0f} s_\n")
        for row in arm.get("rows", []):
            if row.get("acc_norm") is not None:
                accuracy[f"{name}: {row['name']}"] = row["acc_norm"]
        (out / f"{name}.json").write_text(json.dumps(arm.get("rows", []), indent=1, default=str))

    from lowbit.eval.plots import plot_bars

    plot_bars(accuracy, "hellaswag_local acc_norm per arm", "acc_norm", out / "accuracy.png")
    total = time.perf_counter() - t_start
    note = (
        f"Each arm's runs train {arm_steps} steps (the base: {summary['step']}) on the same data with the "
        "same seed, so arm accuracies are those of shorter runs; compare within an arm."
    )
    report = _report(base_row, [note + "\n", *sections] if arms else sections, total, accuracy)
    (out / "report.md").write_text(report)
    print(report)
    print(f"\nwrote {out / 'report.md'}")
    return {"base": base_row, "failures": failures, "seconds": total}


def _report(base: dict, sections: list[str], seconds: float, accuracy: dict) -> str:
    a = base["preset"]
    lines = [
        "# lowbit demo report",
        "",
        f"{datetime.date.today().isoformat()} · {_cpu_name()} · {torch.get_num_threads()} threads · "
        f"torch {torch.__version__} · total {seconds:.0f} s",
        "",
        "## Base: tiny Llama pretrained offline on the generated corpus",
        "",
        f"Model: {base['params']:,} parameters ({a['num_layers']} layers, dim {a['embed_dim']}, "
        f"vocab {a['vocab_size']}), fp32, torch AdamW.",
        "",
        "| training tokens | training seconds | final loss | acc (%) | acc_norm (%) | chance (%) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {base['train_tokens']:,} | {base['train_seconds']:.0f} | {base['final_loss']:.4f} | "
        f"{100 * base['acc']:.2f} | {100 * base['acc_norm']:.2f} | 25.00 |",
        "",
        f"Evaluated with lm-eval's hellaswag task (its own `process_docs`, `acc`, `acc_norm`) on "
        f"{base['items']} generated items in the hellaswag schema (`data/hellaswag_local.jsonl`).",
        "",
        *sections,
    ]
    lines += ["![accuracy per arm](accuracy.png)", ""]
    return "\n".join(lines)
