"""float8 numerics bar: SQNR of output / grad_input / grad_weight vs float64, per recipe, lowbit vs torchao.

Issue #5 bar: >= 20 dB for tensorwise and rowwise, >= 25 dB for grad_weight of rowwise_with_gw_hp, and
bit-equal to torchao 0.14.1's ``convert_to_float8_training`` on the same inputs. Runs on CPU
(``torch._scaled_mm``'s CPU kernel: correct, not fast), both in the same process.

    .venv/bin/python benchmarks/bench_float8_numerics.py [--tokens 2048 --dim 1024 --hidden 2816]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

from lowbit.float8 import RECIPES, Float8TrainingConfig, convert_to_float8_training
from lowbit.quant.float8 import sqnr

BARS = {"tensorwise": (20, 20, 20), "rowwise": (20, 20, 20), "rowwise_with_gw_hp": (20, 20, 25)}


def make_inputs(tokens: int, dim: int, hidden: int, dtype: torch.dtype, kind: str, seed: int = 0):
    """A Linear(dim -> hidden) with nn.Linear's init, activations and upstream gradients."""
    torch.manual_seed(seed)
    layer = nn.Linear(dim, hidden).to(dtype)
    x = torch.randn(tokens, dim)
    if kind == "outlier_tokens":  # 1% of tokens 50x larger: a tensorwise scale is set by them
        idx = torch.randperm(tokens)[: max(1, tokens // 100)]
        x[idx] *= 50
    g = torch.randn(tokens, hidden) * 1e-3
    return layer, x.to(dtype), g.to(dtype)


def run_layer(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


def reference(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor):
    w, b, x, g = layer.weight.double(), layer.bias.double(), x.double(), g.double()
    return x @ w.t() + b, g @ w, g.t() @ x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2816)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from torchao.float8 import Float8LinearConfig
    from torchao.float8 import convert_to_float8_training as ao_convert

    print(f"torch {torch.__version__}; Linear({args.dim} -> {args.hidden}), {args.tokens} tokens; SQNR in dB "
          "vs float64 (out / grad_input / grad_weight)\n")
    header = (
        "| recipe | dtype | inputs | lowbit out | lowbit gx | lowbit gw "
        "| torchao out | torchao gx | torchao gw "
        "| bit-equal to torchao | bar met |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    all_ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("gaussian",):
            base, x, g = make_inputs(args.tokens, args.dim, args.hidden, dtype, kind)
            ref = reference(base, x, g)
            plain = run_layer(copy.deepcopy(base), x, g)
            rows = [("(no float8)", [sqnr(r, t) for r, t in zip(ref, plain)], None, None, None)]
            for recipe in RECIPES:
                ours = convert_to_float8_training(
                    copy.deepcopy(base), config=Float8TrainingConfig.from_recipe(recipe)
                )
                theirs = ao_convert(copy.deepcopy(base), config=Float8LinearConfig.from_recipe_name(recipe))
                a, b = run_layer(ours, x, g), run_layer(theirs, x, g)
                db = [sqnr(r, t) for r, t in zip(ref, a)]
                db_ao = [sqnr(r, t) for r, t in zip(ref, b)]
                equal = all(torch.equal(u, v) for u, v in zip(a, b))
                ok = all(d >= bar for d, bar in zip(db, BARS[recipe]))
                all_ok &= ok and equal
                rows.append((recipe, db, db_ao, equal, ok))
            for recipe, db, db_ao, equal, ok in rows:
                ao = " | ".join(f"{d:.1f}" for d in db_ao) if db_ao else "- | - | -"
                print(f"| {recipe} | {str(dtype).removeprefix('torch.')} | {kind} | "
                      + " | ".join(f"{d:.1f}" for d in db) + f" | {ao} | "
                      + ("-" if equal is None else ("yes" if equal else "NO")) + " | "
                      + ("-" if ok is None else ("yes" if ok else "NO")) + " |")
    print(f"\nall bars met and bit-equal to torchao: {all_ok}")


if __name__ == "__main__":
    main()
