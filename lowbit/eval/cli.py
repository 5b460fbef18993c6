"""``lowbit eval``: lm-eval (hellaswag) on a checkpoint, optionally quantized and compiled for CPU."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from lm_eval.utils import make_table

    from lowbit.eval.evaluate import AUTO, evaluate
    from lowbit.eval.quantize import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="lowbit eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="lowbit checkpoint, run dir, or HF Llama dir")
    p.add_argument("--tasks", default="hellaswag_local",
                   help="comma-separated: hellaswag_local, perplexity_local, or any lm-eval task cached locally")
    p.add_argument("--task-file", help="hellaswag_local items: a hellaswag-format jsonl, or a text source "
                                       "(python-docs, package-docs, FILE.txt) to build cloze items from "
                                       "(default: generated set for models trained on it, else python-docs)")
    p.add_argument("--text", help="perplexity_local documents: a jsonl with a text field, or a text source "
                                  "(default: python-docs)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--scheme", default=AUTO,
                   help="inference quantization: none, 8w, 8da8w, 4w, 8da4w (default: the QAT scheme recorded "
                        "in the checkpoint, else none)")
    p.add_argument("--group-size", type=int,
                   help="weight group size for 4w / 8da4w (default: the QAT recipe's, else the scheme's)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="auto",
                   help="inference dtype (default: bf16 for 4w / 8w / 8da4w, whose fast CPU kernels take bf16; "
                        "fp32 reproduces an fp32 QAT model's fake-quant numbers exactly)")
    p.add_argument("--kl-reference", help="checkpoint to compare next-token distributions with (e.g. the float "
                                          "model): KL divergence and top-1 agreement on --text")
    p.add_argument("--kl-windows", type=int, default=32, help="windows of 512 tokens for --kl-reference")
    p.add_argument("--compile", action="store_true", help="torch.compile with the Xeon Inductor flags")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="directory for results.json")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(a.checkpoint, task_file=a.task_file, tasks=a.tasks, text=a.text, limit=a.limit, scheme=a.scheme,
                           compile=a.compile, batch_size=a.batch_size, output_dir=a.output,
                           group_size=a.group_size,
                           dtype=DTYPE_NAMES[a.dtype], kl_reference=a.kl_reference, kl_windows=a.kl_windows)
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit eval: error: {e}", file=sys.stderr)
        return 2
    if results["results"]:
        print(make_table(results))
    if "kl" in results:
        k = results["kl"]
        print(f"vs {k['reference']} on {k['tokens']} tokens of {k['text']}: KL {k['kl_mean']:.5f} "
              f"± {k['kl_stderr']:.5f} (p99 {k['kl_p99']:.4f}), top-1 agreement {k['top1_agreement']:.4f} "
              f"± {k['top1_stderr']:.4f}, perplexity {k['ppl']:.3f} (reference {k['ppl_reference']:.3f})")
    info = results["lowbit"]
    print(f"checkpoint: {info['checkpoint']}  scheme: {info['scheme'] or 'none (float)'}  compiled: {info['compiled']}")
    if a.output:
        print(f"wrote {a.output}/results.json")
    return 0
