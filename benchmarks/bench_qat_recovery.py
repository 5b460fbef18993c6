"""How much of what PTQ loses QAT recovers, on the real SmolLM2-135M, against torchao's QAT, in one run.

For each scheme (``--schemes 8da4w:32,4w:64,8da3w:32``) the arms are:

- ``float``: the model as shipped (fp32), the reference of every divergence;
- ``ptq``: the model quantized for inference as is (lowbit's deploy path = torchao's CPU configs);
- ``qat``: lowbit's ``qat_recipe`` (config ``smollm2_135m_qat``: distillation from the float model,
  embeddings frozen, optionally learned ranges), then deployed with the scheme its checkpoint records;
- ``control``: ``finetune_recipe`` (config ``smollm2_135m_finetune``) in float with the same data,
  steps and optimizer, then PTQ: what fine-tuning without fake quant gives;
- ``gptq``: lowbit's GPTQ alone (``qat.ranges_init=gptq`` on ``--calibration-rows`` rows of the training
  text, no training), deployed like a QAT checkpoint: what the QAT arm starts from when the config
  initialises its ranges with GPTQ; a stronger PTQ than ``ptq``'s round-to-nearest;
- ``torchao``: torchao's own QAT (``QATConfig(base_config, step="prepare")`` on the same recipe, data,
  steps and optimizer; cross-entropy as torchao / torchtune's QAT recipe trains), then the same
  conversion (8da4w only: the peer's QAT for the other schemes is not a CPU config).

Training text: the installed packages' READMEs (``package-docs``); everything is scored on Python's
documentation (``python-docs``), another source: perplexity, KL divergence from the float model and
top-1 agreement on ``--kl-windows`` windows of 512 tokens (second halves scored), and cloze acc_norm on
``--items`` hellaswag-format items through lm-eval. Recovered = (PTQ - arm) / (PTQ - float) for KL and
perplexity. The QAT arm keeps a checkpoint every ``--curve-every`` steps; each is deployed and its KL
measured, for the recovery-vs-tokens plot.

    python benchmarks/bench_qat_recovery.py --schemes 8da4w:32 --out bench_runs/qat   # ~55 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from lowbit.eval.bench import cpu_description
from lowbit.eval.divergence import compare_to_reference, token_windows
from lowbit.eval.evaluate import prepare_for_inference, score_against_float
from lowbit.eval.tasks import cloze_file, documents
from lowbit.models.checkpoint import list_checkpoints, load_checkpoint
from lowbit.recipes.config import load_config
from lowbit.recipes.runner import run_recipe
from lowbit.recipes.training import TrainingRecipe, run

MODEL = "smollm2-135m"


class TorchaoQATRecipe(TrainingRecipe):
    """The peer: the shared training loop with torchao's own QAT prepare (``QATConfig``) on the model."""

    recipe_name = "torchao_qat"
    scheme = None  # set before run()

    def prepare_model(self, model):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(
            model,
            QATConfig(self.scheme.inference_config(), step="prepare"),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and self.scheme.fits(m),
        )
        return model


def measure(name: str, model, tokenizer, reference, windows, task_file, **extra) -> dict:
    t = time.perf_counter()
    row = {"arm": name, **score_against_float(model, tokenizer, reference, windows, task_file), **extra}
    row["eval_seconds"] = time.perf_counter() - t
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def train(kind: str, out: Path, scheme: str, g: int, a) -> tuple[Path, float, int]:
    """Run one training arm; returns ``(run dir, training seconds, tokens trained)``."""
    run_dir = out / f"{kind}_{scheme}_g{g}"
    common = [
        f"output_dir={run_dir}",
        f"max_steps={a.steps}",
        f"batch_size={a.batch_size}",
        f"data.seq_len={a.seq_len}",
        f"optimizer.lr={a.lr}",
        "progress_bar=false",
        "overwrite=true",
        f"lr_scheduler.num_warmup_steps={a.warmup}",
        "keep_last=1000",
        f"checkpoint_every={a.curve_every if kind == 'qat' else a.steps}",
        f"autocast={'null' if a.autocast == 'none' else a.autocast}",
    ]
    t = time.perf_counter()
    if kind == "qat":
        extra = [
            f"qat.scheme={scheme}",
            f"qat.group_size={g}",
            f"qat.learn_ranges={str(a.learn_ranges).lower()}",
        ]
        if a.ranges_lr is not None:
            extra.append(f"qat.ranges_lr={a.ranges_lr}")
        if a.ce_weight:
            extra.append(f"qat.distill.ce_weight={a.ce_weight}")
        extra += a.qat_set
        recipe = run_recipe("qat_recipe", "smollm2_135m_qat", common + extra)
    elif kind == "control":
        recipe = run_recipe("finetune_recipe", "smollm2_135m_finetune", common)
    else:
        from lowbit.qat import get_scheme

        TorchaoQATRecipe.scheme = get_scheme(scheme, g)
        recipe = run(TorchaoQATRecipe, load_config("smollm2_135m_finetune", common))
    seconds = time.perf_counter() - t
    return run_dir, seconds, recipe.step * a.batch_size * a.seq_len


def gptq_deployed(float_model, tok, scheme: str, g: int, a):
    """The float model with lowbit's GPTQ weights and ranges (the QAT recipe's ``ranges_init=gptq`` start,
    on the same first ``--calibration-rows`` packed rows of the training text), deployed for inference."""
    from lowbit import qat
    from lowbit.data.loaders import pack_documents
    from lowbit.data.real_text import SOURCES
    from lowbit.qat.gptq import gptq_init

    model = qat.prepare(copy.deepcopy(float_model), scheme, group_size=g, learn_ranges=True,
                        ranges_init="mse")
    rows = pack_documents(tok, SOURCES["package-docs"](), a.seq_len)[: a.calibration_rows, :-1]
    gptq_init(model, rows, batch_size=a.batch_size)
    meta = {"qat_scheme": scheme, "qat_group_size": g, "qat_embeddings": False,
            "qat_qparams": qat.learned_qparams(model)}
    deployed, used = prepare_for_inference(qat.unprepare(model), meta)
    assert used == scheme, (used, scheme)
    return deployed


def recovered(rows: dict, arm: str, key: str) -> float | None:
    f, p, q = rows["float"][key], rows["ptq"][key], rows[arm][key]
    return None if math.isclose(p, f) else (p - q) / (p - f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="8da4w:32", help="scheme:group_size, comma-separated")
    ap.add_argument("--arms", default="ptq,qat,control,torchao")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--no-learn-ranges", dest="learn_ranges", action="store_false",
                    help="QAT arm: qat.learn_ranges=false (the config learns them)")
    ap.add_argument("--ranges-lr", type=float, default=None)
    ap.add_argument("--autocast", choices=("bf16", "none"), default="bf16",
                    help="every training arm's matmuls in bf16 on fp32 weights (none: fp32)")
    ap.add_argument("--ce-weight", type=float, default=0.0, help="QAT arm: qat.distill.ce_weight")
    ap.add_argument("--qat-set", action="append", default=[], metavar="KEY=VALUE",
                    help="QAT arm: one more config override (repeatable), e.g. qat.freeze_embeddings=false")
    ap.add_argument(
        "--curve-every", type=int, default=32, help="QAT arm: a checkpoint (and KL) every N steps"
    )
    ap.add_argument("--items", type=int, default=300, help="cloze items (0: no cloze)")
    ap.add_argument(
        "--kl-windows", type=int, default=8, help="512-token windows for perplexity / KL / top-1"
    )
    ap.add_argument("--calibration-rows", type=int, default=32, help="gptq arm: training rows for GPTQ")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_runs/qat_recovery")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    isa = cpu_description()
    arms = a.arms.split(",")
    print(
        f"{isa}; threads {torch.get_num_threads()}; torch {torch.__version__}; args {vars(a)}",
        flush=True,
    )

    float_model, tok, _ = load_checkpoint(MODEL)
    windows = token_windows(tok, documents("python-docs"), 512, a.kl_windows)
    with torch.no_grad():
        reference = float_model(windows)
    task_file = cloze_file("python-docs", a.items) if a.items else None
    results = {"args": vars(a), "isa": isa, "schemes": {}}
    float_row = measure("float", float_model, tok, reference, windows, task_file)

    for spec in a.schemes.split(","):
        scheme, g = spec.split(":")[0], int(spec.split(":")[1])
        rows = {"float": float_row}
        ptq, _ = prepare_for_inference(copy.deepcopy(float_model), None, scheme, group_size=g)
        rows["ptq"] = measure(f"PTQ {scheme} g{g}", ptq, tok, reference, windows, task_file)
        del ptq
        curve = [{"tokens": 0, "kl_mean": rows["ptq"]["kl_mean"], "ppl": rows["ptq"]["ppl"]}]
        if "gptq" in arms:
            t = time.perf_counter()
            deployed = gptq_deployed(float_model, tok, scheme, g, a)
            rows["gptq"] = measure(f"gptq {scheme} g{g}", deployed, tok, reference, windows, task_file,
                                   train_seconds=time.perf_counter() - t, train_tokens=0)
            del deployed
        for kind in [k for k in ("qat", "torchao", "control") if k in arms]:
            if kind == "torchao" and scheme != "8da4w":
                continue
            run_dir, seconds, tokens = train(kind, out, scheme, g, a)
            if kind == "qat":
                for ckpt in list_checkpoints(run_dir)[:-1]:
                    model, _, meta = load_checkpoint(ckpt)
                    deployed, _ = prepare_for_inference(model, meta)
                    with torch.no_grad():
                        kl = compare_to_reference(deployed, reference, windows)
                    curve.append(
                        {
                            "tokens": meta["step"] * a.batch_size * a.seq_len,
                            "kl_mean": kl["kl_mean"],
                            "ppl": kl["ppl"],
                        }
                    )
                    print(json.dumps({"curve": curve[-1]}), flush=True)
            model, _, meta = load_checkpoint(run_dir)
            deployed, used = prepare_for_inference(
                model, meta, scheme if kind != "qat" else "auto", group_size=g
            )
            assert used == scheme, (used, scheme)
            rows[kind] = measure(
                f"{kind} {scheme} g{g}",
                deployed,
                tok,
                reference,
                windows,
                task_file,
                train_seconds=seconds,
                train_tokens=tokens,
            )
            if kind == "qat":
                curve.append({"tokens": tokens, "kl_mean": rows[kind]["kl_mean"], "ppl": rows[kind]["ppl"]})
            del model, deployed
        summary = {
            arm: {
                "kl_recovered": recovered(rows, arm, "kl_mean"),
                "ppl_recovered": recovered(rows, arm, "ppl"),
            }
            for arm in rows
            if arm not in ("float", "ptq")
        }
        curve = [
            {**c, "kl_recovered": (rows["ptq"]["kl_mean"] - c["kl_mean"]) / rows["ptq"]["kl_mean"]}
            for c in curve
        ]
        results["schemes"][spec] = {"rows": rows, "recovered": summary, "curve": curve}
        print(f"== {spec}: recovered (PTQ - arm) / (PTQ - float)", flush=True)
        for arm, r in summary.items():
            extra = rows[arm]
            minutes = extra["train_seconds"] / 60
            cost = (f"GPTQ on {a.calibration_rows} rows, {minutes:.1f} min" if arm == "gptq"
                    else f"{extra['train_tokens']} tokens, {minutes:.1f} min training")
            print(f"   {arm:8s} KL {r['kl_recovered']:+.1%}  perplexity {r['ppl_recovered']:+.1%}  ({cost})",
                  flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "recovery.png")
    print(f"wrote {out / 'results.json'} and {out / 'recovery.png'}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, r in results["schemes"].items():
        if r["curve"]:
            ax.plot(
                [c["tokens"] for c in r["curve"]],
                [100 * c["kl_recovered"] for c in r["curve"]],
                "o-",
                label=f"lowbit QAT {spec}",
            )
        for arm, marker in (("gptq", "D"), ("control", "s"), ("torchao", "^")):
            if arm in r["rows"]:
                ax.plot(
                    [r["rows"][arm]["train_tokens"]],
                    [100 * r["recovered"][arm]["kl_recovered"]],
                    marker,
                    label=f"{arm} {spec}",
                )
    ax.axhline(70, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("PTQ KL divergence recovered (%)")
    ax.set_title("SmolLM2-135M: QAT recovery on held-out text (python-docs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
