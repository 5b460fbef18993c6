"""Training-step overhead of QAT 8da4w vs a plain step, compiled and eager, lowbit vs torchao QAT.

One process, identical data; steps of the variants are interleaved (plain, lowbit, torchao, plain, ...)
so machine-load drift hits them alike; medians are reported. Variants: the plain step; lowbit 8da4w;
lowbit 8da4w with learned ranges; lowbit 8da4w distilled from the float model (the teacher's forward and
the KL loss are the extra); torchao's QAT 8da4w; learned ranges + distillation (the real-model config's
step) in fp32 and under ``torch.autocast`` bf16 (the recipes' ``autocast: bf16``).

    .venv/bin/python benchmarks/bench_qat_overhead.py [--steps 30] [--batch 16] [--seq 128]
    .venv/bin/python benchmarks/bench_qat_overhead.py --model smollm2-135m --layers 4 --batch 2 --seq 256

``--model smollm2-135m --layers N``: the real model's first N decoder layers (and its 49152-token tied
head), for a realistic width and vocabulary at a bearable compile time.

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
from lowbit.eval.bench import cpu_description
from lowbit.models import build_model
from lowbit.recipes.qat_recipe import distillation_loss


def make_step(model, compile_: bool, teacher=None, autocast: bool = False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(model, fullgraph=False) if compile_ else model
    teach = None if teacher is None else torch.compile(teacher) if compile_ else teacher

    def step(rows):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the recipes' autocast: bf16
            logits = fwd(rows[:, :-1])
            if teach is None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
            else:
                with torch.no_grad():
                    t = teach(rows[:, :-1])
                loss = distillation_loss(logits, t, rows[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def prepared(base, **kw):
    return qat.prepare(copy.deepcopy(base), "8da4w", group_size=32, **kw)


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
    p.add_argument("--model", default="tiny", help="'tiny' (preset) or a checkpoint, e.g. smollm2-135m")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    p.add_argument("--variants", default=None, help="comma-separated variant names to time next to plain "
                                                    "(default: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.model == "tiny":
        base = build_model("tiny")
    else:
        from lowbit.models.checkpoint import load_checkpoint

        base = load_checkpoint(a.model)[0].train()
    if a.layers:
        base.layers = base.layers[: a.layers]
    vocab = base.tok_embeddings.num_embeddings
    nparams = sum(p.numel() for p in base.parameters())
    print(f"{a.model} ({len(base.layers)} layers): {nparams / 1e6:.2f}M params, batch {a.batch} x seq "
          f"{a.seq}, threads {torch.get_num_threads()}, {a.steps} timed steps after {a.warmup} warmup, "
          f"median; {cpu_description()}")
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)]
    for mode in a.modes.split(","):
        compiled = mode == "compiled"
        teacher = copy.deepcopy(base).eval().requires_grad_(False)
        specs = {  # name: (model factory, distilled?, autocast?); built only when chosen
            "plain": (lambda: copy.deepcopy(base), False, False),
            "lowbit 8da4w": (lambda: prepared(base), False, False),
            "lowbit 8da4w ranges": (lambda: prepared(base, learn_ranges=True), False, False),
            "lowbit 8da4w distill": (lambda: prepared(base), True, False),
            "torchao QAT 8da4w": (lambda: torchao_qat(copy.deepcopy(base)), False, False),
            "lowbit ranges+distill": (lambda: prepared(base, learn_ranges=True), True, False),
            "ranges+distill bf16ac": (lambda: prepared(base, learn_ranges=True), True, True),
        }
        keep = {"plain", *a.variants.split(",")} if a.variants else set(specs)
        if keep - set(specs):
            raise SystemExit(f"unknown --variants {sorted(keep - set(specs))}; known: {list(specs)}")
        steps = {k: make_step(build(), compiled, teacher if distil else None, autocast)
                 for k, (build, distil, autocast) in specs.items() if k in keep}
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
            print(f"{mode:9s} {k:22s} step {v * 1000:8.1f} ms   ratio vs plain {v / med['plain']:.3f}x")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
