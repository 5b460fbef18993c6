"""Issue 16: lowbit's CPU hand-off against llama.cpp on SmolLM2-135M, same machine, same prompt, same threads.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py [--threads 2] [--prompt-len 64] [--decode 32]
        [--rounds 3] [--schemes none,8w,4w,8da4w | none:eager,4w:compiled] [--modes eager,compiled]
        [--llama Q4_0,Q4_1,Q8_0,F16] [--qat-checkpoint CKPT] [--ppl-windows 8] [--out DIR]

Arms: lowbit ``deploy`` per scheme (group size: the largest that divides SmolLM2's widths) eager and
compiled (``compile_for_cpu``), and llama.cpp (llama-cpp-python) on SmolLM2's GGUF as shipped (Q4_1)
and on GGUFs lowbit exports from it (``lowbit export``: Q4_0 / Q8_0 with llama.cpp's own rule, F16). Every
arm is loaded (and compiled) first; then ``--rounds`` rounds each time every arm once, in turn, on the
same prompt (real text, ``--prompt-len`` tokens) with greedy decoding of ``--decode`` tokens: prefill
tokens/s, time to first token (prefill + argmax), decode tokens/s (median step). Memory: the resident
memory the arm added when it was loaded and warmed up (one process holds every arm). The bandwidth floor
of each arm is ``measured read bandwidth / weight bytes read per token`` (every matrix once; a tied head
is the embedding matrix, read in full). Without llama-cpp-python its arms are skipped (said so).

``--qat-checkpoint`` (a QAT checkpoint of SmolLM2 trained with ``qat.scheme=q4_0`` or ``q8_0``): perplexity
measured inside llama.cpp of the PTQ file (the float model quantized by llama.cpp's rule) and of the QAT
export, on the same held-out text (Python's documentation), with lowbit's own fake-quant perplexity of
both next to it. Without it, only the PTQ perplexity is printed (and says so).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.eval.bench import cpu_description

MODEL = "smollm2-135m"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_bandwidth_gbs(threads: int, mib: int = 1024) -> float:
    """Best of 5 full reads of a ``mib`` MiB fp32 buffer with ``threads`` threads (torch.sum), GB/s."""
    x = torch.ones(mib * 2**20 // 4)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x
    return best


class LowbitArm:
    def __init__(self, base, scheme: str, mode: str, max_len: int):
        from lowbit.eval import compile_for_cpu, deploy, deployment_of
        from lowbit.eval.generate import Generator
        from lowbit.eval.quantize import model_bytes

        model = deploy(copy.deepcopy(base), scheme)
        self.name = f"lowbit {deployment_of(model).label} {mode}"
        self.weight_bytes = model_bytes(model)
        self.compile_s = 0.0
        if mode == "compiled":
            model = compile_for_cpu(model)
        self.gen = Generator(model, 1, max_len)

    def warm(self, prompt, decode):
        t = time.perf_counter()
        self.run(prompt, decode)  # compiles prefill and decode graphs
        self.compile_s = time.perf_counter() - t

    @torch.no_grad()
    def run(self, prompt: list[int], decode: int):
        self.gen.reset()
        x = torch.tensor([prompt])
        t0 = time.perf_counter()
        tok = self.gen.prefill(x).argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        steps = []
        for _ in range(decode):
            t = time.perf_counter()
            tok = self.gen.step(tok).argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
        return t1 - t0, steps


class LlamaArm:
    def __init__(self, path: Path, label: str, threads: int, max_len: int):
        from gguf import GGUFReader
        from llama_cpp import Llama

        self.name = f"llama.cpp {label}"
        self.weight_bytes = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors
                                if t.name != "token_embd.weight" or not _has_output(path))
        self.llm = Llama(model_path=str(path), n_ctx=max_len + 8, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=False, verbose=False)
        self.compile_s = 0.0

    def warm(self, prompt, decode):
        self.run(prompt, decode)

    def run(self, prompt: list[int], decode: int):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        steps = []
        for _ in range(decode):
            t = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
        return t1 - t0, steps


def _has_output(path: Path) -> bool:
    """Untied head: token_embd is only gathered from (one row per token), not read in full."""
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(str(path)).tensors)


def llama_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Perplexity inside llama.cpp: each window evaluated from an empty cache, every next token scored."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1] + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, logits_all=True, verbose=False)
    nll, n = 0.0, 0
    try:
        for w in windows.tolist():
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32))
            lp = torch.log_softmax(logits[:-1].double(), -1)
            nll -= lp.gather(-1, torch.tensor(w[1:]).unsqueeze(-1)).sum().item()
            n += len(w) - 1
    finally:
        llm.close()
    return math.exp(nll / n)


@torch.no_grad()
def lowbit_ppl(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        lp = torch.log_softmax(model(w[None])[0, :-1].double(), -1)
        nll -= lp.gather(-1, w[1:, None]).sum().item()
        n += w.numel() - 1
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--schemes", default="none,8w,4w,8da4w",
                   help="lowbit schemes; SCHEME:MODE runs one mode only (e.g. none:eager,4w:compiled)")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--llama", default="Q4_0,Q4_1,Q8_0,F16", help="llama.cpp formats (Q4_1: the shipped file)")
    p.add_argument("--qat-checkpoint", default=None)
    p.add_argument("--ppl-windows", type=int, default=8, help="windows of 256 tokens for the perplexities")
    p.add_argument("--out", default=None, help="directory for the exported GGUFs (default: a temp dir)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from lowbit.eval.divergence import token_windows
    from lowbit.eval.gguf_export import export_gguf
    from lowbit.eval.tasks import documents
    from lowbit.models.checkpoint import load_checkpoint, model_file

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {cpu_description()}")
    print(f"torch {torch.__version__}, {a.threads} threads; prompt {a.prompt_len} tokens, {a.decode} greedy "
          f"decode steps, {a.rounds} interleaved rounds")
    base, tok, _ = load_checkpoint(MODEL)
    prompt_ids = token_windows(tok, documents("python-docs"), a.prompt_len, 1)[0].tolist()
    max_len = a.prompt_len + a.decode + 1
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_vs_llamacpp_"))
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    files = {}
    if not have_llama:
        print("llama-cpp-python is not installed: the llama.cpp arms are skipped "
              "(pip install 'lowbit[bench]', i.e. CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
    else:
        import llama_cpp

        print(f"llama-cpp-python {llama_cpp.__version__}")
        for kind in [k.strip() for k in a.llama.split(",") if k.strip()]:
            if kind == "Q4_1":
                files[kind] = (model_file(MODEL), "Q4_1 (as shipped)")
            else:
                path = out / f"smollm2_{kind.lower()}.gguf"
                if not path.exists():
                    export_gguf(MODEL, path, kind.lower(), float_type="f16")
                files[kind] = (path, f"{kind} (lowbit export, PTQ)")

    arms = []
    for path, label in files.values():
        gc.collect()
        r0 = rss_mb()
        arm = LlamaArm(path, label, a.threads, max_len)
        arm.warm(prompt_ids, a.decode)
        arm.mem_mb = rss_mb() - r0
        arms.append(arm)
        print(f"  loaded {arm.name}: +{arm.mem_mb:.0f} MB resident", flush=True)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for entry in [s.strip() for s in a.schemes.split(",") if s.strip()]:
        scheme, _, only = entry.partition(":")  # "4w:compiled": that mode only
        for mode in [only] if only else modes:
            gc.collect()
            r0 = rss_mb()
            arm = LowbitArm(base, scheme, mode, max_len)
            arm.warm(prompt_ids, a.decode)
            arm.mem_mb = rss_mb() - r0
            arms.append(arm)
            gc.collect()
            print(f"  loaded {arm.name}: +{arm.mem_mb:.0f} MB resident, first run (compile) "
                  f"{arm.compile_s:.1f} s", flush=True)

    if arms:
        speed_table(arms, prompt_ids, a)

    if have_llama and a.ppl_windows:
        perplexities(base, tok, out, a)


def speed_table(arms, prompt_ids, a) -> None:
    """Time every arm ``a.rounds`` times, interleaved, and print the table."""
    stats = {arm.name: ([], []) for arm in arms}
    for _ in range(a.rounds):
        for arm in arms:  # interleaved: every arm once per round
            pre, steps = arm.run(prompt_ids, a.decode)
            stats[arm.name][0].append(pre)
            stats[arm.name][1].extend(steps)
    bw = read_bandwidth_gbs(a.threads)
    print(f"\nmeasured read bandwidth ({a.threads} threads, 1 GiB torch.sum, best of 5): {bw:.1f} GB/s\n")
    ref = next((arm.name for arm in arms if arm.name.startswith("llama.cpp Q4_0")), arms[0].name)
    ref_dec = 1 / statistics.median(stats[ref][1])
    print("| engine, format | decode tok/s | x llama.cpp Q4_0 | floor tok/s | % of floor | prefill tok/s "
          "| TTFT ms | weight MB/token | +RSS MB | first run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        pre, steps = stats[arm.name]
        dec = 1 / statistics.median(steps)
        floor = bw * 1e9 / arm.weight_bytes
        print(f"| {arm.name} | {dec:.1f} | {dec / ref_dec:.2f}x | {floor:.0f} | {100 * dec / floor:.0f}% | "
              f"{len(prompt_ids) / statistics.median(pre):.0f} | {1e3 * statistics.median(pre):.1f} | "
              f"{arm.weight_bytes / 2**20:.1f} | {arm.mem_mb:.0f} | {arm.compile_s:.1f} |", flush=True)
    print(f"(TTFT = prefill of {len(prompt_ids)} tokens + argmax; ratio column: decode tok/s / {ref}'s)")


def perplexities(base, tok, out: Path, a) -> None:
    """PTQ (and QAT) perplexity inside llama.cpp, with lowbit's fake quant of the same numbers."""
    from lowbit import qat
    from lowbit.eval.divergence import token_windows
    from lowbit.eval.gguf_export import export_gguf
    from lowbit.eval.tasks import documents
    from lowbit.models.checkpoint import load_checkpoint

    windows = token_windows(tok, documents("python-docs"), 256, a.ppl_windows)
    print(f"\nperplexity on {windows.numel()} tokens of Python's documentation ({a.ppl_windows} windows "
          "of 256), measured inside llama.cpp (and lowbit's fake quant of the same numbers):")
    for kind in ("q4_0", "q8_0"):
        ptq = out / f"smollm2_{kind}_ptq_f32emb.gguf"
        if not ptq.exists():
            export_gguf(MODEL, ptq, kind)
        sim = lowbit_ppl(qat.prepare(copy.deepcopy(base), kind), windows)
        print(f"  PTQ {kind}: llama.cpp {llama_ppl(ptq, windows, a.threads):.3f}  (lowbit fake quant "
              f"{sim:.3f})", flush=True)
    print(f"  float: lowbit {lowbit_ppl(base, windows):.3f}")
    if a.qat_checkpoint:
        qmodel, _, qmeta = load_checkpoint(a.qat_checkpoint)
        kind = qmeta.get("qat_scheme")
        path = out / f"qat_{kind}.gguf"
        export_gguf(a.qat_checkpoint, path, kind, force=True)
        sim = lowbit_ppl(qat.prepare(qmodel, kind, embeddings=bool(qmeta.get("qat_embeddings"))), windows)
        print(f"  QAT {kind} ({a.qat_checkpoint}): llama.cpp {llama_ppl(path, windows, a.threads):.3f}  "
              f"(lowbit fake quant {sim:.3f})")
    else:
        print("  QAT: no --qat-checkpoint given, PTQ only")


if __name__ == "__main__":
    main()
