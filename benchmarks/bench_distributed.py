"""Issue 7 bars on CPU: 2-process FSDP2 runs of each recipe, 1 vs 2 rank losses, per-rank optimizer state.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 20] [--preset tiny]

Runs, through the real launcher (``lowbit run RECIPE [--nproc_per_node 2] --config ...``), one process
and two processes (gloo) of finetune_recipe with AdamW8bit and of qat_recipe (8da4w), and prints:
wall time of every run (the CI bar: each 2-process run under 3 minutes), the largest relative loss
difference 1 vs 2 ranks, and the per-rank optimizer state bytes (the memory bar: <= 0.5x + 1%).
Reference rows: torch's AdamW (how far plain fp32 training drifts between 1 and 2 ranks), and a
1-process run that accumulates the two half batches each rank sees (the same reduction structure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(recipe, config, overrides, nproc):
    cmd = [sys.executable, "-m", "lowbit.cli", "run", recipe]
    if nproc > 1:
        cmd += ["--nproc_per_node", str(nproc)]
    cmd += ["--config", config, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def read(run_dir):
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return losses, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    a = p.parse_args()
    half = [f"batch_size={a.batch_size // 2}", "gradient_accumulation_steps=2"]
    # (recipe, config, overrides for both, extra overrides for the 1-process run)
    runs = {
        "finetune_recipe + AdamW8bit": (
            "finetune_recipe",
            "tiny_pretrain",
            ["optimizer._component_=lowbit.optim.AdamW8bit"],
            [],
        ),
        "finetune_recipe + torch AdamW (reference)": ("finetune_recipe", "tiny_pretrain", [], []),
        "finetune_recipe + AdamW8bit, 1 proc accumulates 2 half batches": (
            "finetune_recipe",
            "tiny_pretrain",
            ["optimizer._component_=lowbit.optim.AdamW8bit"],
            half,
        ),
        "qat_recipe 8da4w + AdamW8bit": (
            "qat_recipe",
            "tiny_qat",
            ["optimizer._component_=lowbit.optim.AdamW8bit", "qat.scheme=8da4w"],
            [],
        ),
        "qat_recipe 8da4w + AdamW8bit, 1 proc accumulates 2 half batches": (
            "qat_recipe",
            "tiny_qat",
            ["optimizer._component_=lowbit.optim.AdamW8bit", "qat.scheme=8da4w"],
            half,
        ),
    }
    common = [f"max_steps={a.steps}", f"checkpoint_every={a.steps}", f"batch_size={a.batch_size}",
              f"data.seq_len={a.seq_len}", "data.num_docs=1024", "progress_bar=false"]
    print(f"tiny preset (0.92M params), {a.steps} steps, global batch {a.batch_size} x {a.seq_len} tokens; "
          f"OMP_NUM_THREADS=1 per process; {os.cpu_count()} CPUs\n")
    print(
        "| run | 1 process s | 2 processes s | max rel loss diff | state B/rank (1 proc) "
        "| state B/rank (2 procs) "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (recipe, config, extra, one_only)) in enumerate(runs.items()):
            walls, results = [], []
            for nproc in (1, 2):
                out = Path(tmp) / f"{i}_{nproc}"
                args = [*common, *extra, *(one_only if nproc == 1 else []), f"output_dir={out}"]
                walls.append(launch(recipe, config, args, nproc))
                results.append(read(out))
            (l1, s1), (l2, s2) = results
            diff = max(abs(x - y) / abs(x) for x, y in zip(l1, l2))
            b1, b2 = s1["optimizer_state_bytes_per_rank"], s2["optimizer_state_bytes_per_rank"]
            ratio = max(b2) / b1[0]
            print(f"| {name} | {walls[0]:.1f} | {walls[1]:.1f} | {diff:.2e} | {b1[0]:,} | "
                  f"{' / '.join(f'{b:,}' for b in b2)} | {ratio:.4f} |")


if __name__ == "__main__":
    main()
