"""Optimizer step on a ~1B-parameter bf16 Llama-shaped model (GPU): lowbit 8-bit / 4-bit / fp8 vs torch
fused AdamW (and bitsandbytes / torchao AdamW8bit where importable), against the bytes-moved floor.

Needs torch and triton only (lowbit is imported from this copy of the tree; peers are optional):

    python benchmarks/bench_optim_cuda.py                        # cuda, Llama-3.2-1B shapes (1.24B params)
    python benchmarks/bench_optim_cuda.py --device cpu --size tiny   # smoke test on CPU

All optimizers step the same parameters (fixed random bf16 gradients), round-robin, one step of each per
round, so they share the machine's state; the figure is the median step time (CUDA events around a
synchronized step). Per optimizer it also prints:

- the bytes floor: the bytes a step must move (read and write the state, read and write the parameters,
  read the gradients) divided by the HBM bandwidth measured here with a large device-to-device copy;
- device kernels per step, counted with ``torch.profiler`` (and the lowbit Triton launches, counted at the
  kernel's launcher);
- state bytes per parameter.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lowbit from this tree, installed or not

SIZES = {  # Llama-3.2-1B: 16 layers, dim 2048, 8 kv heads of 64, ffn 8192, vocab 128256 (tied embedding)
    "1b": dict(dim=2048, kv_dim=512, ffn=8192, layers=16, vocab=128256),
    "tiny": dict(dim=64, kv_dim=32, ffn=256, layers=2, vocab=512),
}


def make_params(size: str, device: str) -> list[torch.nn.Parameter]:
    c = SIZES[size]
    d, kv, f = c["dim"], c["kv_dim"], c["ffn"]
    shapes = [(c["vocab"], d)]
    for _ in range(c["layers"]):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f), (d,), (d,)]
    shapes.append((d,))
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 0.02)
        p.grad = torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 1e-3
        params.append(p)
    return params


def state_bytes(opt) -> int:
    """Bytes of optimizer state (tensor subclasses such as torchao's count their codes, scales, maps)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                parts = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a)]
                total += sum(t.numel() * t.element_size() for t in parts or [v])
    return total


def arms(peers: list[str]) -> dict:
    from lowbit import optim as lo

    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "lowbit AdamW8bit": lambda ps: lo.AdamW8bit(ps, lr=1e-4),
        "lowbit AdamW4bit": lambda ps: lo.AdamW4bit(ps, lr=1e-4),
        "lowbit AdamWFp8": lambda ps: lo.AdamWFp8(ps, lr=1e-4),
        "lowbit AdamW4bit rank1": lambda ps: lo.AdamW4bit(ps, lr=1e-4, v_norm="rank1"),
    }
    if "bnb" in peers:
        try:
            import bitsandbytes as bnb

            out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
        except Exception as e:
            print(f"bitsandbytes: not used ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    if "torchao" in peers:
        try:
            import torchao.optim

            out["torchao AdamW8bit"] = lambda ps: torchao.optim.AdamW8bit(ps, lr=1e-4)
        except Exception as e:
            print(f"torchao: not used ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write), best of 5."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


class TritonLaunches:
    """Counts launches of lowbit's Triton step kernel (compiled and interpreted variants)."""

    def __init__(self):
        self.n = 0
        try:
            from lowbit.optim import _triton_step
        except Exception:  # no triton: lowbit runs C++ / torch steps
            return
        for interpret in (False, True):
            for name in _triton_step.KERNELS:
                self._wrap(_triton_step.kernel(interpret, name))

    def _wrap(self, k):
        run = k.run

        def counting(*a, **kw):
            self.n += 1
            return run(*a, **kw)

        k.run = counting


def device_kernels(opt, device: str) -> tuple[int, int]:
    """(kernels, memcpy/memset) the device runs for one ``opt.step()``, from torch.profiler."""
    if device != "cuda":
        return -1, -1
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        sync(device)
    kernels = copies = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            copies += 1
        else:
            kernels += 1
    return kernels, copies


def check_exact(device: str) -> bool:
    """A few steps of every lowbit optimizer on ``device`` (Triton on CUDA) and with the pure-torch step on
    CPU, from the same parameters and gradients: parameters and states must be bit-identical."""
    from lowbit import optim as lo

    def bits(t):
        t = t.detach().cpu()
        return (
            t.view(torch.uint8)
            if t.element_size() == 1
            else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
        )

    arms = {
        "AdamW8bit": (lo.AdamW8bit, {}),
        "AdamW4bit": (lo.AdamW4bit, {}),
        "AdamWFp8": (lo.AdamWFp8, {}),
        "Adam4bit rank1": (lo.Adam4bit, {"v_norm": "rank1", "weight_decay": 0.1}),
        "AdamW8bit sr": (lo.AdamW8bit, {"bf16_stochastic_round": True}),
    }
    ok = True
    for name, (cls, kw) in arms.items():
        runs = []
        for dev, backend in ((device, os.environ.get("LOWBIT_OPTIM_BACKEND", "auto")), ("cpu", "torch")):
            os.environ["LOWBIT_OPTIM_BACKEND"] = backend
            g = torch.Generator().manual_seed(0)
            ps = [
                torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(torch.bfloat16).to(dev))
                for s in ((4099,), (64, 65), (300,), (33, 128))
            ]
            opt = cls(ps, lr=1e-2, min_quant_size=1000, **kw)
            torch.manual_seed(1)  # stochastic-rounding seeds
            for step in range(3):
                for p in ps:
                    gr = torch.randn(p.shape, generator=g) * 1e-2
                    if step == 1:
                        gr.view(-1)[7] = float("nan")
                    p.grad = gr.to(torch.bfloat16).to(dev)
                opt.step()
            runs.append((ps, opt))
        (pa, oa), (pb, ob) = runs
        same = all(torch.equal(bits(a), bits(b)) for a, b in zip(pa, pb)) and all(
            torch.equal(bits(oa.state[a][k]), bits(ob.state[b][k]))
            for a, b in zip(pa, pb)
            for k in oa.state[a]
        )
        ok &= same
        print(
            f"bit-exact vs the CPU torch step ({name}, bf16, 3 steps, a NaN gradient): "
            f"{'yes' if same else 'NO'}"
        )
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds first (Triton compiles, state allocation)"
    )
    ap.add_argument(
        "--peers", default="bnb,torchao", help="comma-separated optional peers: bnb, torchao ('' none)"
    )
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the matching optimizers")
    ap.add_argument(
        "--no-check", action="store_true", help="skip the bit-exactness check against the CPU step"
    )
    args = ap.parse_args()
    device = args.device
    backend_env = os.environ.get("LOWBIT_OPTIM_BACKEND", "auto")
    if not args.no_check:
        check_exact(device)
        os.environ["LOWBIT_OPTIM_BACKEND"] = backend_env
    torch.manual_seed(0)

    params = make_params(args.size, device)
    nparams = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    bw = bandwidth(device, 2 << 30 if device == "cuda" else 256 << 20)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    print(
        f"## optimizer step, {nparams / 1e6:.1f}M bf16 params ({args.size}), {name}, "
        f"torch {torch.__version__}, "
        f"triton {tv}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"LOWBIT_OPTIM_BACKEND={os.environ.get('LOWBIT_OPTIM_BACKEND', 'auto')}"
    )
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")

    launches = TritonLaunches()
    makers = arms([s for s in args.peers.split(",") if s])
    if args.only:
        makers = {
            k: v for k, v in makers.items() if any(s.lower() in k.lower() for s in args.only.split(","))
        }
    opts = {}
    for arm, make in makers.items():
        try:
            opts[arm] = make(params)
        except Exception as e:
            print(f"{arm}: failed to build: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    times: dict[str, list[float]] = {k: [] for k in opts}
    per_step_launches: dict[str, list[int]] = {k: [] for k in opts}
    for r in range(args.warmup + args.rounds):
        for arm, opt in list(opts.items()):
            for group in opt.param_groups:  # a new learning rate every round: must not recompile anything
                lr = 1e-4 * (1 + 0.01 * (r % 7))
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            sync(device)
            before = launches.n
            try:
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    opt.step()
                    end.record()
                    end.synchronize()
                    dt = start.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    opt.step()
                    dt = time.perf_counter() - t0
            except Exception as e:
                print(f"{arm}: step failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                del opts[arm]
                continue
            per_step_launches[arm].append(launches.n - before)
            if r >= args.warmup:
                times[arm].append(dt)

    fused = statistics.median(times["torch AdamW fused"]) if times.get("torch AdamW fused") else None
    print(
        "\n| optimizer | step ms (median) | x fused AdamW | MB moved / step | floor ms | x floor | "
        "device kernels / step | lowbit Triton launches / step | state B/param |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for arm, opt in opts.items():
        med = statistics.median(times[arm])
        sb = state_bytes(opt)
        moved = 2 * sb + 3 * param_bytes  # state read + written; params read + written; grads read
        floor = moved / bw
        kernels, copies = device_kernels(opt, device)
        kern = f"{kernels} (+{copies} copies)" if kernels >= 0 else "n/a (cpu)"
        tl_launch = sorted(set(per_step_launches[arm][args.warmup :])) or [0]
        rows[arm] = (med, floor)
        print(
            f"| {arm} | {med * 1e3:.2f} | {med / fused if fused else float('nan'):.2f} | {moved / 1e6:.1f} | "
            f"{floor * 1e3:.2f} | {med / floor:.2f} | {kern} | {'/'.join(map(str, tl_launch))} | "
            f"{sb / nparams:.3f} |"
        )
    if "lowbit AdamW8bit" in rows and fused:
        med, floor = rows["lowbit AdamW8bit"]
        print(
            f"\nbar (8-bit step <= 1.3x bytes floor and faster than torch fused AdamW): "
            f"{med / floor:.2f}x floor, {med / fused:.2f}x fused -> "
            f"{'MET' if med <= 1.3 * floor and med < fused else 'NOT MET'}"
        )
    try:
        from lowbit.optim import _triton_step

        n = sum(
            len(c[0])
            for k in _triton_step.KERNELS
            for c in _triton_step.kernel(False, k).device_caches.values()
        )
        print(f"compiled specializations of the lowbit Triton kernel: {n} (one per format x state kind used)")
    except Exception:
        pass


if __name__ == "__main__":
    main()
