"""float8 speed bar (H100): a Llama3-8B-shaped transformer block, compiled forward+backward.

Issue #5 bar, all arms in one process on one GPU: tensorwise >= 1.25x bf16 tokens/s, rowwise >= 1.10x,
and lowbit >= torchao's float8 on the same block (ratio >= 1.00).

Block: dim 4096, 32 heads / 8 kv heads, SwiGLU ffn 14336, RMSNorm, RoPE, causal SDPA; 8192 tokens per
batch (1 x 8192). bf16 parameters and activations; every arm is ``torch.compile``d (default mode) and
timed with CUDA events (median of ``--iters`` steps after ``--warmup``). The block is written here in
plain torch; lowbit converts it; torchao (optional) converts a copy for its arms.

    .venv/bin/python benchmarks/bench_float8_h100.py                      # the bar, needs an SM89+ GPU
    .venv/bin/python benchmarks/bench_float8_h100.py --device cpu --dim 256 --ffn 768 --heads 4 \\
        --kv-heads 2 --tokens 256 --iters 3 --warmup 1                 # smoke test of the script (not a bar)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.float8 import Float8TrainingConfig, convert_to_float8_training


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) rotated pairwise by (S, D/2) angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class Block(nn.Module):
    """One Llama-3 decoder layer: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rope_tables(seq: int, head_dim: int, device, base: float = 500_000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def time_arm(block: nn.Module, x, cos, sin, iters: int, warmup: int) -> float:
    """Median seconds of one compiled forward+backward."""
    fn = torch.compile(block)
    g = torch.randn_like(x)
    cuda = x.device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        xi = x.detach().requires_grad_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn(xi, cos, sin).backward(g)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            dt = time.perf_counter() - t0
        block.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192, help="sequence length of the single batch row")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-torchao", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        print(f"device: {torch.cuda.get_device_name(device)} (SM{cap[0]}{cap[1]}), torch {torch.__version__}")
        if cap < (8, 9):
            raise SystemExit("float8 GEMMs need SM89+ (Ada/Hopper); this GPU cannot run the bar")
    else:
        print(
            f"device: {device} (smoke test only: torch._scaled_mm on CPU is not a fast kernel), "
            f"torch {torch.__version__}"
        )
    torch.manual_seed(0)
    base = Block(args.dim, args.heads, args.kv_heads, args.ffn).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(args.tokens, args.dim // args.heads, device)

    arms: dict[str, nn.Module] = {"bf16": copy.deepcopy(base)}
    for recipe in ("tensorwise", "rowwise"):
        arms[f"lowbit {recipe}"] = convert_to_float8_training(
            copy.deepcopy(base), config=Float8TrainingConfig.from_recipe(recipe)
        )
    if not args.no_torchao:
        try:
            from torchao.float8 import Float8LinearConfig
            from torchao.float8 import convert_to_float8_training as ao_convert

            for recipe in ("tensorwise", "rowwise"):
                arms[f"torchao {recipe}"] = ao_convert(
                    copy.deepcopy(base), config=Float8LinearConfig.from_recipe_name(recipe)
                )
        except ImportError as e:
            print(f"torchao arm skipped: {e}")

    print(f"block: dim {args.dim}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}; {args.tokens} tokens; "
          f"compiled fwd+bwd, median of {args.iters} after {args.warmup} warmup\n")
    secs = {}
    for name, block in arms.items():
        torch._dynamo.reset()
        secs[name] = time_arm(block, x, cos, sin, args.iters, args.warmup)
        print(
            f"{name:20s} {1000 * secs[name]:9.2f} ms  {args.tokens / secs[name]:12,.0f} tokens/s", flush=True
        )

    print("\nratios (tokens/s)" + ("" if device.type == "cuda" else " -- CPU smoke test, not the bar") + ":")
    bars = {"lowbit tensorwise": 1.25, "lowbit rowwise": 1.10}
    for name, bar in bars.items():
        r = secs["bf16"] / secs[name]
        print(f"  {name} / bf16 = {r:.3f}  (bar >= {bar:.2f}: {'met' if r >= bar else 'NOT met'})")
    for recipe in ("tensorwise", "rowwise"):
        if f"torchao {recipe}" in secs:
            r = secs[f"torchao {recipe}"] / secs[f"lowbit {recipe}"]
            print(
                f"  lowbit {recipe} / torchao {recipe} = {r:.3f}  "
                f"(bar >= 1.00: {'met' if r >= 1.0 else 'NOT met'})"
            )
            print(f"  torchao {recipe} / bf16 = {secs['bf16'] / secs[f'torchao {recipe}']:.3f}")


if __name__ == "__main__":
    main()
