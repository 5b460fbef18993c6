"""Training-step overhead of QAT 8da4w vs a plain step, compiled and eager, lowbit vs torchao QAT.

One process, the tiny preset, identical data; steps of the three variants are interleaved
(plain, lowbit, torchao, plain, ...) so machine-load drift hits them alike; medians are reported.

    .venv/bin/python benchmarks/bench_qat_overhead.py [--steps 30] [--batch 16] [--seq 128]

Bar: compiled lowbit QAT 8da4w step <= 1.15x the compiled plain step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit import qat
from lowbit.models import build_model


def make_step(model, compile_: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model, fullgraph=False) if compile_ else model

    def step(rows):
        logits = fwd(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def torchao_qat(model):
    from torchao.quantization import Int8DynamicActivationInt4WeightConfig, quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(Int8DynamicActivationInt4WeightConfig(group_size=32), step="prepare"))
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--modes", default="compiled,eager")
    a = p.parse_args()
    torch.manual_seed(0)
    base = build_model("tiny")
    vocab = base.tok_embeddings.num_embeddings
    nparams = sum(p.numel() for p in base.parameters())
    print(f"tiny preset: {nparams / 1e6:.2f}M params, batch {a.batch} x seq {a.seq}, threads "
          f"{torch.get_num_threads()}, {a.steps} timed steps after {a.warmup} warmup, median")
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)]
    for mode in a.modes.split(","):
        compiled = mode == "compiled"
        variants = {
            "plain": copy.deepcopy(base),
            "lowbit 8da4w": qat.prepare(copy.deepcopy(base), "8da4w", group_size=32),
            "torchao QAT 8da4w": torchao_qat(copy.deepcopy(base)),
        }
        steps = {k: make_step(m, compiled) for k, m in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for i in range(a.warmup + a.steps):
            for k, step in steps.items():
                t0 = time.perf_counter()
                step(data[i % len(data)])
                dt = time.perf_counter() - t0
                if i >= a.warmup:
                    times[k].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{mode:9s} {k:18s} step {v * 1000:8.1f} ms   ratio vs plain {v / med['plain']:.3f}x")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
