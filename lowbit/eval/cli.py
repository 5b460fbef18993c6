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
    p.add_argument("--tasks", default="hellaswag_local", choices=["hellaswag_local", "hellaswag"])
    p.add_argument("--task-file", help="hellaswag-format jsonl (default: lowbit's generated set)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--scheme", default=AUTO,
                   help="inference quantization: none, 8w, 8da8w, 4w, 8da4w (default: the QAT scheme recorded "
                        "in the checkpoint, else none)")
    p.add_argument("--group-size", type=int,
                   help="weight group size for 4w / 8da4w (default: the QAT recipe's, else the scheme's)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="auto",
                   help="inference dtype (default: bf16 for 4w / 8w / 8da4w, whose fast CPU kernels take bf16; "
                        "fp32 reproduces an fp32 QAT model's fake-quant numbers exactly)")
    p.add_argument("--compile", action="store_true", help="torch.compile with the Xeon Inductor flags")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="directory for results.json")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(a.checkpoint, task_file=a.task_file, tasks=a.tasks, limit=a.limit, scheme=a.scheme,
                           compile=a.compile, batch_size=a.batch_size, output_dir=a.output,
                           group_size=a.group_size,
                           dtype=DTYPE_NAMES[a.dtype])
    except (FileNotFoundError, ValueError) as e:
        from lowbit.data import DataError
        from lowbit.models.checksums import CorruptCheckpointError

        print(f"lowbit eval: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DataError | CorruptCheckpointError) else 2  # bad files vs. bad arguments
    print(make_table(results))
    info = results["lowbit"]
    print(f"checkpoint: {info['checkpoint']}  scheme: {info['scheme'] or 'none (float)'}  compiled: {info['compiled']}")
    if a.output:
        print(f"wrote {a.output}/results.json")
    return 0
