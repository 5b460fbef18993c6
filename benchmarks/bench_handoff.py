"""Issue 6 bar: accuracy through the hand-off equals the fake-quant model's, item by item.

    .venv/bin/python benchmarks/bench_handoff.py --checkpoint RUN_DIR [--task-file F.jsonl] [--limit N]

For every scheme and both dtypes (fp32; the deployed default, bf16 for 4w / 8w / 8da4w), evaluates the
checkpoint fake-quantized (``lowbit.qat.prepare``) and deployed (``quantize_for_inference``, torchao's CPU
configs) on the same items and prints how many items get the same acc_norm choice and the largest
log-likelihood difference.
"""

import argparse

import torch

from lowbit.eval.handoff import compare_handoff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task-file", default=None, help="hellaswag-format jsonl (default: the generated set)")
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args()
    print(
        "| scheme | dtype | items | same choice | max abs loglik diff "
        "| acc_norm fake quant | acc_norm deployed |"
    )
    print("|---|---|---|---|---|---|---|")
    for scheme in ("8da4w", "4w", "8w", "8da8w"):
        for dtype in (torch.float32, None):
            r = compare_handoff(a.checkpoint, scheme, dtype=dtype, task_file=a.task_file, limit=a.limit)
            if dtype is None and r["dtype"] == "torch.float32":
                continue  # the default is already fp32 for this scheme
            print(
                f"| {scheme} | {r['dtype'].removeprefix('torch.')} | {r['items']} | {r['same_choice']} | "
                f"{r['max_abs_ll_diff']:.3g} | {r['acc_norm_fake_quant']:.4f} | "
                f"{r['acc_norm_deployed']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
