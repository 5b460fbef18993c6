"""Bit-exactness of lowbit QAT fake quant vs the torchao CPU inference it simulates.

For each scheme and dtype: random linear layers (several shapes, normal and small-range x ~ 0.002 N(0,1)
activations), prepared forward vs ``qat.convert`` (torchao ``quantize_``) forward. Prints the number of
differing elements, the max abs diff and the max diff in bf16 ulps of the dot-product magnitude
sum_k |x_k w_k|; then the same for the whole tiny model's logits (per-layer differences propagate).

    .venv/bin/python benchmarks/bench_qat_exactness.py

Bar: bit-for-bit, or <= 1 bf16 ulp where the real kernel accumulates differently (4w).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit import qat
from lowbit.models import build_model

SHAPES = [(1, 64, 48), (7, 128, 32), (33, 256, 96), (5, 512, 64), (2, 2048, 16)]  # (M, K, N)


def bf16_ulp(mag: torch.Tensor) -> torch.Tensor:
    e = torch.frexp(mag.float().abs().clamp_min(2.0**-126))[1]
    return torch.ldexp(torch.ones_like(mag, dtype=torch.float32), e - 8)


def layer_stats(scheme: str, dtype: torch.dtype, small: bool):
    n_diff = n = 0
    max_abs = max_ulp = 0.0
    for seed, (m, k, n_out) in enumerate(SHAPES):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(k, n_out).to(dtype))
        x = (torch.randn(m, k) * (0.002 if small else 1.0)).to(dtype)
        qat.prepare(model, scheme, group_size=32 if scheme in ("8da4w", "4w") else None)
        with torch.no_grad():
            a = model(x)
            mag = x.float().abs() @ model[0].weight.float().abs().t()
            b = qat.convert(copy.deepcopy(model))(x)
        d = (a.float() - b.float()).abs()
        n_diff += int((a != b).sum())
        n += a.numel()
        max_abs = max(max_abs, float(d.max()))
        max_ulp = max(max_ulp, float((d / bf16_ulp(mag)).max()))
    return n_diff, n, max_abs, max_ulp


def model_stats(scheme: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_model("tiny").to(dtype)
    qat.prepare(model, scheme, group_size=32 if scheme in ("8da4w", "4w") else None)
    tok = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 64))
    with torch.no_grad():
        a = model(tok)
        b = qat.convert(copy.deepcopy(model))(tok)
    d = (a.float() - b.float()).abs()
    return int((a != b).sum()), a.numel(), float(d.max()), float(a.float().abs().max())


def main() -> None:
    print(
        f"{'scheme':7s} {'dtype':9s} {'x range':8s} {'differing':>16s} {'max abs diff':>13s} "
        f"{'max ulp(bf16)':>14s}"
    )
    for scheme in qat.SCHEMES:
        for dtype in (torch.float32, torch.bfloat16):
            for small in (False, True):
                nd, n, ma, mu = layer_stats(scheme, dtype, small)
                print(f"{scheme:7s} {str(dtype)[6:]:9s} {'0.002' if small else '1':8s} {nd:7d} / {n:6d} "
                      f"{ma:13.3g} {mu:14.4f}")
    print("\nwhole tiny model (prepared vs converted logits, 2 x 64 tokens):")
    for scheme in qat.SCHEMES:
        for dtype in (torch.float32, torch.bfloat16):
            nd, n, ma, amax = model_stats(scheme, dtype)
            print(f"{scheme:7s} {str(dtype)[6:]:9s} differing {nd:6d} / {n}  max abs diff {ma:.3g} "
                  f"(max |logit| {amax:.3g})")


if __name__ == "__main__":
    main()
