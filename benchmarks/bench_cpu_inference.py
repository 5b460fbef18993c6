"""CPU decode throughput per quantization scheme vs the fp32 eager baseline (the CPU
inference bars of benchmarks/RESULTS.md), in one process.

    .venv/bin/python benchmarks/bench_cpu_inference.py [--preset small_150m] [--rounds 5] [--steps 24]

Model: the ``small_150m`` preset (random weights: speed only). Arms, all alive at once:
fp32 eager (baseline), bf16 compiled (no quantization), 8w / 4w / 8da4w eager and compiled (the lowbit
hand-off: ``quantize_for_inference`` + ``compile_for_cpu``), and torchao's own 8da4w path on x86
(dequantize + fp32 matmul, eager). Decode steps of all arms are timed in interleaved rounds (so load from
other processes hits every arm alike) and the per-step median over all rounds is reported.

Also printed: memory bandwidth (large copy / large read), the bandwidth floor per arm (bytes of weights
read per token / read bandwidth), and a kernel-level comparison on one decode GEMV shape of the
alternatives for the int4 / int8 matmul (torchao CPU kernels, ``torch._int_mm``, an Inductor-generated
dequant-GEMV).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from lowbit.eval.bench import bench_model
from lowbit.eval.compile import compile_for_cpu
from lowbit.eval.generate import Generator
from lowbit.eval.quantize import model_bytes, quantize_for_inference
from lowbit.models import build_model, num_params


def _median_ms(fn, n=7, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def bandwidth_gbs() -> tuple[float, float]:
    """(copy GB/s counting read + write, read GB/s of a sum) over 512 MiB buffers."""
    a = torch.ones(128 * 2**20, dtype=torch.float32)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    copy_ms = _median_ms(lambda: b.copy_(a), n=5)
    read_ms = _median_ms(lambda: a.sum(), n=5)
    return 2 * nbytes / copy_ms / 1e6, nbytes / read_ms / 1e6


def gemv_alternatives(n=2816, k=1024, layers=24, g=32) -> dict[str, float]:
    """ms for ``layers`` distinct (1, k) @ (k, n) decode GEMVs (weights out of cache) per implementation."""
    torch.manual_seed(0)
    x32 = torch.randn(1, k)
    xb = x32.bfloat16()
    res = {}

    def each(fn, ws):
        return _median_ms(lambda: [fn(w) for w in ws], n=5)

    res["fp32 F.linear"] = each(
        lambda w: torch.nn.functional.linear(x32, w), [torch.randn(n, k) for _ in range(layers)]
    )
    res["bf16 F.linear"] = each(lambda w: torch.nn.functional.linear(xb, w),
                                [torch.randn(n, k).bfloat16() for _ in range(layers)])
    w8 = [(torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n)) for _ in range(layers)]
    res["_weight_int8pack_mm bf16 (8w)"] = each(
        lambda w: torch._weight_int8pack_mm(xb, w[0], w[1].bfloat16()), w8
    )
    res["_weight_int8pack_mm fp32"] = (
        each(lambda w: torch._weight_int8pack_mm(x32, w[0], w[1]), w8[:4]) * layers / 4
    )
    x8 = torch.randint(-128, 127, (17, k), dtype=torch.int8)  # _int_mm needs M > 16
    res["_int_mm int8 x int8 (M=17)"] = each(lambda w: torch._int_mm(x8, w[0].t()), w8[:4]) * layers / 4
    w4 = [
        (
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1
            ),
            torch.rand(k // g, n, 2),
        )
        for _ in range(layers)
    ]
    res[f"_weight_int4pack_mm bf16 g{g} (4w)"] = each(
        lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w[0], g, w[1].bfloat16()), w4)
    res[f"_weight_int4pack_mm fp32 g{g}"] = each(
        lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x32, w[0], g, w[1]), w4[:4]) * layers / 4

    def inductor_gemv(x, packed, scale, zero):
        # packed (n, k/g, g/2) uint8: low nibbles = first half of each group, high = second half
        nn_, groups, h = packed.shape
        xv = x.float().view(groups, 2, h)
        part = ((packed & 15).float() * xv[:, 0] + (packed >> 4).float() * xv[:, 1]).sum(-1)  # (n, groups)
        xs = xv.sum((1, 2))
        return ((part - 8 * xs) * scale.float() + zero.float() * xs).sum(-1)[None].to(x.dtype)

    q4 = [(torch.randint(0, 256, (n, k // g, g // 2), dtype=torch.uint8), torch.rand(n, k // g).bfloat16(),
           torch.rand(n, k // g).bfloat16()) for _ in range(layers)]
    with torch.no_grad():
        c = torch.compile(inductor_gemv, dynamic=False)
        res[f"Inductor dequant-GEMV int4 g{g} bf16"] = each(lambda w: c(xb, *w), q4)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small_150m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per arm per round")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 avoids OpenMP barrier stalls when other processes load the cores)")
    p.add_argument("--bf16-arm", action="store_true", help="also time unquantized bf16 compiled")
    p.add_argument(
        "--eager-only", action="store_true", help="skip the compiled arms (minutes instead of ~25)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model(args.preset).eval()
    print(f"preset {args.preset}: {num_params(base) / 1e6:.1f}M params, random weights (speed only); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    copy_bw, read_bw = bandwidth_gbs()
    print(f"memory bandwidth: copy {copy_bw:.1f} GB/s (read+write), read {read_bw:.1f} GB/s")

    arms: dict[str, torch.nn.Module] = {}
    nbytes: dict[str, int] = {}

    def add(name, scheme, dtype=None, compiled=False):
        if compiled and args.eager_only:
            return
        m = quantize_for_inference(copy.deepcopy(base), scheme, dtype=dtype)
        nbytes[name] = model_bytes(m)
        arms[name] = compile_for_cpu(m) if compiled else m

    add("fp32 eager", None)
    if args.bf16_arm:
        add("bf16 compiled", None, dtype=torch.bfloat16, compiled=True)
    for scheme in ("8w", "4w", "8da4w"):
        add(f"{scheme} eager", scheme)
        add(f"{scheme} compiled", scheme, compiled=True)
    add("8da4w torchao-fp32 eager", "8da4w", dtype=torch.float32)
    base = None  # noqa: F841  (free the float copy; arms hold their own)
    gc.collect()

    total = args.prompt_len + args.steps + 2
    prompt = torch.randint(0, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    gens = {}
    with torch.no_grad():
        for name, m in arms.items():  # warm-up (compiles) and one profiled run for prefill / host time
            t = time.perf_counter()
            info = bench_model(m, prompt_len=args.prompt_len, decode_tokens=8, repeats=1, profile=True)
            print(
                f"  warm {name:26s} {time.perf_counter() - t:6.1f} s  "
                f"decode {info['decode_ms']:8.1f} ms/tok  "
                f"prefill {info['prefill_tok_s']:7.1f} tok/s"
                f"  ttft {info['ttft_ms']:7.1f} ms  host {info['host_ms']:6.2f} ms/tok  "
                f"kernel {info['kernel_ms']:6.2f} ms/tok"
            )
            gens[name] = Generator(m, 1, total)
        steps = {name: [] for name in arms}
        for r in range(args.rounds):
            for name, gen in gens.items():
                gen.reset()
                tok = gen.prefill(prompt).argmax(-1, keepdim=True)
                for _ in range(args.steps):
                    t = time.perf_counter()
                    tok = gen.step(tok).argmax(-1, keepdim=True)
                    steps[name].append(time.perf_counter() - t)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {1e3 * statistics.median(s[-args.steps:]):.1f}" for n, s in steps.items()) + " ms/step")

    ms = {n: 1e3 * statistics.median(s) for n, s in steps.items()}
    base_ms = ms["fp32 eager"]
    print("\n| arm | decode ms/tok | decode tok/s | vs fp32 eager | weights MB | floor ms (read bw) | "
          "floor / measured |")
    print("|---|---|---|---|---|---|---|")
    for n in arms:
        floor = nbytes[n] / (read_bw * 1e6)
        print(f"| {n} | {ms[n]:.2f} | {1e3 / ms[n]:.2f} | {base_ms / ms[n]:.2f}x | {nbytes[n] / 2**20:.1f} | "
              f"{floor:.2f} | {floor / ms[n]:.0%} |")

    def bar(label, num, den, need):
        if num in ms and den in ms:
            ratio = ms[num] / ms[den]
            print(f"  {label}: {ratio:.2f}x (bar >= {need}x) {'PASS' if ratio >= need else 'FAIL'}")

    print("\nbars:")
    for s in ("4w", "8w"):
        bar(f"{s} compiled vs fp32 eager", "fp32 eager", f"{s} compiled", 1.8)
        bar(f"{s} compiled vs {s} eager", f"{s} eager", f"{s} compiled", 1.3)
    bar("8da4w eager vs fp32 eager (never slower)", "fp32 eager", "8da4w eager", 1.0)
    bar("8da4w compiled vs fp32 eager (never slower)", "fp32 eager", "8da4w compiled", 1.0)
    bar("8da4w compiled (int4pack path) vs fp32 eager", "fp32 eager", "8da4w compiled", 1.5)
    bar("8da4w torchao-fp32 eager vs fp32 eager", "fp32 eager", "8da4w torchao-fp32 eager", 1.0)
    bar("4w compiled vs fp32 eager (stretch)", "fp32 eager", "4w compiled", 3.0)

    if not args.skip_gemv:
        print("\none decode GEMV (1x1024 @ 1024x2816), 24 distinct weights (out of cache), ms for all 24:")
        res = gemv_alternatives()
        for k, v in res.items():
            print(f"  {k:40s} {v:8.2f} ms   ({res['fp32 F.linear'] / v:.2f}x fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
