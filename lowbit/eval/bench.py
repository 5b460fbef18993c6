"""CPU inference throughput: prefill / decode tokens/s, time to first token, memory, host overhead.

One row per (scheme, compiled or eager) configuration of one model::

    lowbit bench --preset small_150m --schemes none,8w,4w,8da4w --both --output bench_out
    lowbit bench --checkpoint runs/tiny/step_100 --schemes 4w --compile

Measurements (``bench_model``), all on the same prompt of random token ids:

* ``prefill_tok_s``: ``B * P`` / median time of one prefill forward (P = ``--prompt-len``).
* ``ttft_ms``: median time from the prompt to the first sampled token (prefill + argmax).
* ``decode_tok_s``: ``B`` / median time of one decode step (one token per sequence, static KV cache).
* ``peak_rss_mb``: peak resident memory of the process during the timed generation (sampled).
* ``model_mb``: bytes of the weights as stored (quantized codes + scales + float parts).
* ``host_ms`` / ``kernel_ms`` per decode step: ``torch.profiler`` sums the self CPU time of the ATen ops,
  Inductor's C++ kernels (compiled with ``cpp.enable_kernel_profile``) and the compiled graph's own C++
  code as ``kernel_ms``; ``host_ms`` is the unprofiled step time minus that: Python, Dynamo guards,
  dispatch and tensor-subclass overhead outside the kernels (clipped at 0: the profiler itself slows
  kernels a little).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.compile import compile_for_cpu
from lowbit.eval.deployment import INFERENCE_SCHEMES, deploy, deployment_of
from lowbit.eval.generate import Generator
from lowbit.eval.quantize import model_bytes

# Schemes with a torch CPU kernel (q4_0 / q8_0 run in llama.cpp: benchmarks/bench_vs_llamacpp.py).
BENCH_SCHEMES: tuple[str, ...] = tuple(s for s in INFERENCE_SCHEMES if s not in ("q4_0", "q8_0"))

RANDOM_WEIGHTS_NOTE = "random-weight preset: speed only, the generated text is meaningless"


class _PeakRSS:
    """Samples the process RSS (``/proc/self/statm``) in a thread; ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.002):
        self.interval, self.peak, self._stop = interval_s, _rss(), threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def cpu_description() -> str:
    """``"<CPU model>; ISA: <flags>"``: the CPU's name and its vector / matrix extensions (the ``avx*``,
    ``amx*``, ``fma`` and ``f16c`` flags of ``/proc/cpuinfo``, as ``lscpu`` lists them), printed next to
    every benchmark figure. ``"unknown CPU; ISA: unknown"`` where ``/proc/cpuinfo`` cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU; ISA: unknown"

    def field(key: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")

    flags = sorted(f for f in field("flags").split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return f"{field('model name') or 'unknown CPU'}; ISA: {' '.join(flags) or 'unknown'}"


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the (non-resettable) high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kernel_time_us(prof) -> float:
    """Self CPU time (us) of the events that do the work: ATen ops, Inductor's C++ kernels and the rest of
    the compiled graph's C++ code (the self time of ``## Call CompiledFxGraph``: with ``cpp_wrapper`` some
    extern kernels, e.g. prepacked oneDNN linears, run there without their own profiler event)."""
    total = 0.0
    for e in prof.events():
        if e.name.startswith(("aten::", "graph_", "cpp_fused", "aoti_torch_", "mkldnn", "onednn",
                              "## Call CompiledFxGraph")):
            total += e.self_cpu_time_total
    return total


@torch.no_grad()
def bench_model(model: nn.Module, *, prompt_len: int = 64, decode_tokens: int = 32, batch_size: int = 1,
                repeats: int = 3, vocab_size: int | None = None, profile: bool = True, seed: int = 0) -> dict:
    """Time prefill and decode of ``model`` (eager or compiled) with a static KV cache.

    Args:
        model: torchtune ``TransformerDecoder`` or its compiled wrapper.
        prompt_len / decode_tokens / batch_size: prompt ``(B, P)`` and number of decode steps timed.
        repeats: full prefill + decode runs timed after one warm-up run (which compiles); medians reported.
        profile: also run ``decode_tokens`` steps under ``torch.profiler`` for host vs kernel time.

    Returns:
        dict with ``prefill_tok_s``, ``ttft_ms``, ``decode_tok_s``, ``decode_ms``, ``peak_rss_mb``,
        ``warmup_s`` (the first run, which compiles a compiled model), ``host_ms``, ``kernel_ms`` (None
        without ``profile``).
    """
    if prompt_len < 1 or decode_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("prompt_len, decode_tokens, batch_size and repeats must all be >= 1")
    dec = getattr(model, "_orig_mod", model)
    vocab = vocab_size or dec.tok_embeddings.num_embeddings
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=g)
    gen = Generator(model, batch_size, prompt_len + decode_tokens + 1)

    def run(steps: list[float], prefills: list[float], ttfts: list[float]):
        gen.reset()
        t0 = time.perf_counter()
        logits = gen.prefill(prompt)
        t1 = time.perf_counter()
        tok = logits.argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        prefills.append(t1 - t0)
        ttfts.append(t2 - t0)
        for _ in range(decode_tokens):
            t = time.perf_counter()
            tok = gen.step(tok).argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)

    t = time.perf_counter()
    run([], [], [])  # warm-up: compiles the prefill and decode graphs
    warmup_s = time.perf_counter() - t
    steps, prefills, ttfts = [], [], []
    with _PeakRSS() as mem:
        for _ in range(repeats):
            run(steps, prefills, ttfts)
    step_s = statistics.median(steps)
    out = {
        "prefill_tok_s": batch_size * prompt_len / statistics.median(prefills),
        "ttft_ms": 1e3 * statistics.median(ttfts),
        "decode_tok_s": batch_size / step_s,
        "decode_ms": 1e3 * step_s,
        "peak_rss_mb": mem.peak / 2**20,
        "warmup_s": warmup_s,
        "host_ms": None,
        "kernel_ms": None,
    }
    if profile:
        gen.reset()
        tok = gen.prefill(prompt).argmax(-1, keepdim=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(decode_tokens):
                tok = gen.step(tok).argmax(-1, keepdim=True)
        kernel_ms = _kernel_time_us(prof) / 1e3 / decode_tokens
        out["kernel_ms"] = kernel_ms
        out["host_ms"] = max(0.0, 1e3 * step_s - kernel_ms)
    return out


def _load(source: str | nn.Module, dtype: torch.dtype | None):
    """(float model, description, checkpoint metadata or None) from a preset name, a checkpoint or a
    model."""
    if isinstance(source, nn.Module):
        return source.eval(), "given model", None
    src = str(source)
    from lowbit.models import PRESETS, build_model

    if src in PRESETS:
        torch.manual_seed(0)
        model = build_model(src).eval()
        return model, f"preset {src} ({RANDOM_WEIGHTS_NOTE})", None
    path = Path(src)
    if not path.exists():
        raise ValueError(
            f"{src!r} is neither a model preset ({sorted(PRESETS)}) nor an existing checkpoint dir"
        )
    from lowbit.models.checkpoint import load_checkpoint

    model, _tok, meta = load_checkpoint(path)
    return model.eval(), f"checkpoint {meta.get('path', src)}", meta


def parse_schemes(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    if not schemes:
        raise ValueError("--schemes is empty; give e.g. none,8w,4w,8da4w")
    bad = [s for s in schemes if s not in BENCH_SCHEMES]
    if bad:
        raise ValueError(
            f"unknown scheme(s) {bad} in --schemes; expected names from {list(BENCH_SCHEMES)} (llama.cpp's "
            "formats: benchmarks/bench_vs_llamacpp.py)"
        )
    return schemes


def bench_rows(source: str | nn.Module, schemes: list[str], *, modes=("eager", "compiled"),
               dtype: torch.dtype | None = None, group_size: int | None = None, prompt_len: int = 64,
               decode_tokens: int = 32, batch_size: int = 1, repeats: int = 3, profile: bool = True,
               log=print) -> tuple[list[dict], str]:
    """Benchmark each (scheme, mode) on copies of one float model; returns (rows, description).

    ``none`` is benchmarked in the model's own dtype (the fp32 baseline) unless ``dtype`` is given;
    the quantized schemes in ``dtype`` or their kernel's dtype, each through :func:`lowbit.eval.deploy`
    (group size: ``group_size``, else the checkpoint's recorded one for its own scheme, else the largest
    that divides the model's widths). A row's ``scheme`` is the deployment's label, e.g.
    ``4w(group_size=64)`` (``[q/n linears]`` appended when some linears stayed float; deploy refuses a
    mostly float model). Each row also has ``speedup``: decode tok/s over the first row (the baseline).
    """
    for m in modes:
        if m not in ("eager", "compiled"):
            raise ValueError(f"unknown mode {m!r}; expected 'eager' or 'compiled'")
    base, desc, meta = _load(source, dtype)
    rows = []
    for scheme in schemes:
        for mode in modes:
            gs = group_size if scheme in ("4w", "8da4w") else None
            # a checkpoint's own QAT scheme deploys as recorded (group size, embeddings)
            spec = meta if meta and scheme == meta.get("qat_scheme") else scheme
            model = deploy(copy.deepcopy(base), spec, group_size=gs, dtype=dtype)
            label = deployment_of(model).label
            nbytes = model_bytes(model)
            mdtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            if mode == "compiled":
                # kernel profile: Inductor's C++ kernels show up in torch.profiler (for kernel_ms)
                model = compile_for_cpu(model, flags={"cpp.enable_kernel_profile": True} if profile else None)
            t = time.perf_counter()
            r = bench_model(model, prompt_len=prompt_len, decode_tokens=decode_tokens, batch_size=batch_size,
                            repeats=repeats, profile=profile)
            row = {"scheme": label, "mode": mode, "dtype": str(mdtype).removeprefix("torch."),
                   "model_mb": nbytes / 2**20, **r, "wall_s": time.perf_counter() - t}
            rows.append(row)
            log(f"  {label:20s} {mode:8s} {row['dtype']:8s} decode {row['decode_tok_s']:7.2f} tok/s  "
                f"prefill {row['prefill_tok_s']:8.1f} tok/s  ttft {row['ttft_ms']:7.1f} ms")
            del model
            gc.collect()
    for row in rows:
        row["speedup"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows, desc


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of bench rows (speedup is decode tok/s relative to the first row; "first run s" is
    the warm-up prefill + decode, which includes compilation for a compiled row)."""
    head = ("| scheme | mode | dtype | decode tok/s | speedup | prefill tok/s | TTFT ms | host ms/tok | "
            "kernel ms/tok | model MB | peak RSS MB | first run s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['mode']} | {r['dtype']} | {r['decode_tok_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['prefill_tok_s']:.1f} | {r['ttft_ms']:.1f} | {_fmt(r['host_ms'], '.2f')} | "
            f"{_fmt(r['kernel_ms'], '.2f')} | {r['model_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{_fmt(r.get('warmup_s'), '.1f')} |"
        )
    return "\n".join(lines)
