"""Low-bit optimizer step time and state memory vs torch AdamW, torchao and bitsandbytes (CPU).

Setup: 8 square 1024x1024 linears (8.4M params), fixed random gradients. Every optimizer owns a copy
of the params; steps are timed round-robin (one step of each optimizer per round, in a new random order
every round) so all peers see the same machine load; the figure is the median per optimizer.

    .venv/bin/python benchmarks/bench_optim.py [--threads N] [--rounds R] [--dtype fp32|bf16|both]
        [--no-external]
        [--baseline REV]   # also the lowbit optimizers with the C++ kernel of git revision REV, interleaved

Quality (the demo's optimizer arm: tiny-model pretraining with fp32 AdamW, AdamW8bit, AdamWFp8,
AdamW4bit; same steps, data, seed; final loss = mean of the last 20 training losses):

    .venv/bin/python benchmarks/bench_optim.py --quality [--workdir DIR] [--optimizers adamw,adamwfp8]
        [key=value ...]

(``--optimizers``: a subset, by lower-cased name; runs are seeded, so subsets run as separate processes
give the same losses as one process running all of them, and "vs" compares with the first one listed.)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

N_LAYERS, DIM = 8, 1024


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(N_LAYERS):
        p = torch.nn.Parameter((torch.randn(DIM, DIM, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(DIM, DIM, generator=g) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if not isinstance(v, torch.Tensor):
                continue
            parts = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a)]  # torchao subclasses
            for t in parts or [v]:
                total += t.numel() * t.element_size()
    return total


def peers(dtype, external=True):
    """name -> (factory, peer names for the ratio); ``external=False`` skips torchao / bitsandbytes."""
    from lowbit import optim as lo

    out = {
        "torch AdamW fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None),
        "torch AdamW foreach": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), None),
    }
    if external:
        try:
            import torchao.optim as tao

            out["torchao AdamW8bit"] = (lambda ps: tao.AdamW8bit(ps, lr=1e-3), None)
            out["torchao AdamW4bit"] = (lambda ps: tao.AdamW4bit(ps, lr=1e-3), None)
            out["torchao AdamWFp8"] = (lambda ps: tao.AdamWFp8(ps, lr=1e-3), None)
        except Exception as e:  # pragma: no cover
            print(f"torchao unavailable: {e}")
        try:
            import bitsandbytes as bnb

            out["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), None)
        except Exception as e:  # pragma: no cover
            print(f"bitsandbytes unavailable: {e}")
    out["lowbit AdamW8bit"] = (
        lambda ps: lo.AdamW8bit(ps, lr=1e-3),
        ["torchao AdamW8bit", "bitsandbytes AdamW8bit"],
    )
    out["lowbit AdamW4bit"] = (lambda ps: lo.AdamW4bit(ps, lr=1e-3), ["torchao AdamW4bit"])
    out["lowbit AdamWFp8"] = (lambda ps: lo.AdamWFp8(ps, lr=1e-3), ["torchao AdamWFp8"])
    return out


def baseline_arms(rev: str) -> dict:
    """The lowbit optimizers with the C++ step of git revision ``rev`` (sources extracted to a temp dir and
    built there), to time a kernel change against its parent in one run."""
    import importlib.util
    from pathlib import Path

    from lowbit import optim as lo
    from lowbit.optim import adam as adam_mod
    from lowbit.optim import backend

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="lowbit_baseline_"))
    files = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "--name-only", "-r", rev, "lowbit/optim/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if f == "lowbit/optim/_cpu_kernel.py" or f.startswith("lowbit/optim/csrc/"):
            out = tmp / Path(f).relative_to("lowbit/optim")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(
                subprocess.run(
                    ["git", "-C", str(repo), "show", f"{rev}:{f}"], capture_output=True, check=True
                ).stdout
            )
    spec = importlib.util.spec_from_file_location("lowbit.optim._cpu_kernel_baseline", tmp / "_cpu_kernel.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    assert base.get() is not None, "baseline kernel did not build"

    def with_baseline(opt):
        step = opt.step

        def baseline_step(*a, **k):
            saved = adam_mod._cpu_kernel, backend._cpu_kernel
            adam_mod._cpu_kernel = backend._cpu_kernel = base
            try:
                return step(*a, **k)
            finally:
                adam_mod._cpu_kernel, backend._cpu_kernel = saved

        opt.step = baseline_step
        return opt

    return {
        f"lowbit AdamW8bit @{rev}": (
            lambda ps: with_baseline(lo.AdamW8bit(ps, lr=1e-3)),
            ["lowbit AdamW8bit"],
        ),
        f"lowbit AdamW4bit @{rev}": (
            lambda ps: with_baseline(lo.AdamW4bit(ps, lr=1e-3)),
            ["lowbit AdamW4bit"],
        ),
        f"lowbit AdamWFp8 @{rev}": (lambda ps: with_baseline(lo.AdamWFp8(ps, lr=1e-3)), ["lowbit AdamWFp8"]),
    }


def run(dtype, rounds, slow_rounds, external=True, baseline=None):
    entries = peers(dtype, external)
    if baseline:
        entries.update(baseline_arms(baseline))
    opts, nparams = {}, 0
    for name, (make, _) in entries.items():
        try:
            ps = make_params(dtype)
            nparams = sum(p.numel() for p in ps)
            o = make(ps)
            o.step()  # first step: state allocation, builds
            opts[name] = o
        except Exception as e:
            print(f"{name}: failed on {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    times = {n: [] for n in opts}
    order = random.Random(0)
    for r in range(rounds):
        names = list(opts)
        order.shuffle(names)  # a new order every round: no optimizer always follows the same one
        for name in names:
            o = opts[name]
            slow = name.startswith(("torchao", "bitsandbytes"))
            if slow and r >= slow_rounds:
                continue
            t0 = time.perf_counter()
            o.step()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    fused = med.get("torch AdamW fused")
    dname = str(dtype).replace("torch.", "")
    print(
        f"\n### {dname} params, {nparams / 1e6:.1f}M, threads={torch.get_num_threads()}, "
        f"rounds={rounds} (peers from torchao/bitsandbytes: {slow_rounds})"
    )
    print("| optimizer | step ms (median) | x fused AdamW | speed-up vs peer | state B/param |")
    print("|---|---|---|---|---|")
    for name, o in opts.items():
        vs_peer = ""
        peer_names = entries[name][1] or []
        vs_peer = ", ".join(f"{med[p] / med[name]:.2f}x vs {p}" for p in peer_names if p in med)
        print(
            f"| {name} | {med[name]:.1f} | {med[name] / fused:.2f} | {vs_peer} | "
            f"{state_bytes(o) / nparams:.3f} |"
        )
    if baseline:  # same-round pairs see the same load: their ratio is the steadier figure
        print(
            f"\ncurrent / @{baseline}, per round: median [quartiles] of the ratio; ratio of the fastest steps"
        )
        for name in opts:
            if name.endswith(f"@{baseline}") and name.split(" @")[0] in times:
                cur, base = times[name.split(" @")[0]], times[name]
                q = statistics.quantiles([a / b for a, b in zip(cur, base)], n=4)
                print(
                    f"- {name.split(' @')[0]}: {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]; "
                    f"fastest {min(cur) / min(base):.3f}"
                )


FIRST_STEP = r"""
import os, time, torch, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
from lowbit.optim import AdamW8bit
ps = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(8)]
for p in ps: p.grad = torch.randn_like(p)
t1 = time.perf_counter()
opt = AdamW8bit(ps, lr=1e-3); opt.step()
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
print(f"first step incl. C++ build: {t2 - t1:.2f} s (import {t1 - t0:.2f} s); "
      f"second step {1e3 * (t3 - t2):.1f} ms")
"""


def first_step():
    with tempfile.TemporaryDirectory() as d:  # empty build cache: the first step builds the kernel
        env = dict(os.environ, LOWBIT_EXTENSIONS_DIR=d)
        out = subprocess.run([sys.executable, "-c", FIRST_STEP], env=env, capture_output=True, text=True)
        print("\n" + (out.stdout.strip() or out.stderr.strip()[-2000:]))


QUALITY_EXTRA = {"AdamW4bit rank1": ("lowbit.optim.AdamW4bit", ["optimizer.v_norm=rank1"])}


def quality(workdir, overrides, only=None):
    from pathlib import Path

    from lowbit.data.synthetic import generate_hellaswag, write_jsonl
    from lowbit.demo.optim_arm import OPTIMIZERS, run_optim_arm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    eval_file = write_jsonl(generate_hellaswag(num_items=500, seed=0), workdir / "eval.jsonl")
    opts = {name: (path, []) for name, path in OPTIMIZERS.items()}
    opts["AdamWFp8"] = ("lowbit.optim.AdamWFp8", [])
    opts.update(QUALITY_EXTRA)
    by_key = {name.replace(" ", "-").split("-(")[0].lower(): name for name in opts}
    if only:
        unknown = [k for k in only if k not in by_key]
        if unknown:
            raise SystemExit(f"--optimizers: unknown {unknown}; choose from {sorted(by_key)}")
        opts = {by_key[k]: opts[by_key[k]] for k in only}
    else:
        opts = {k: v for k, v in opts.items() if k not in QUALITY_EXTRA}
    t0 = time.perf_counter()
    rows, table = [], None
    for name, (path, extra) in opts.items():  # one run (own directory) per optimizer
        key = name.replace(" ", "-").split("-(")[0].lower()
        out = run_optim_arm(
            workdir / key, eval_file, ["progress_bar=false", *overrides, *extra], optimizers={name: path}
        )
        rows += out["rows"]
        table = table or out["markdown"].splitlines()[:2]
        ref = rows[0]["final_loss"]
        line = out["markdown"].splitlines()[2]
        cells = line.split(" | ")
        cells[2] = f"{100 * (rows[-1]['final_loss'] / ref - 1):+.2f}%"
        table.append(" | ".join(cells))
    print(
        f"\n### quality: tiny_pretrain {' '.join(overrides) or '(defaults)'}, "
        f"threads={torch.get_num_threads()}, "
        f"{time.perf_counter() - t0:.0f} s (column 3 vs {rows[0]['name']})"
    )
    print("\n".join(table))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--slow-rounds", type=int, default=5, help="rounds for the (slow) torchao / bnb peers")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--no-first-step", action="store_true")
    ap.add_argument("--no-external", action="store_true", help="skip the torchao / bitsandbytes peers")
    ap.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also time the lowbit optimizers with the C++ kernel of git revision REV (interleaved)",
    )
    ap.add_argument("--quality", action="store_true", help="run the tiny-model pretraining comparison")
    ap.add_argument("--workdir", default="lowbit_runs/bench_optim_quality")
    ap.add_argument("--optimizers", default=None, help="quality: comma-separated subset, e.g. adamw,adamwfp8")
    args, overrides = ap.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        quality(args.workdir, overrides, args.optimizers.split(",") if args.optimizers else None)
        return
    if not args.no_first_step:
        first_step()
    for d in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        run(
            torch.float32 if d == "fp32" else torch.bfloat16,
            args.rounds,
            args.slow_rounds,
            not args.no_external,
            args.baseline,
        )


if __name__ == "__main__":
    main()
