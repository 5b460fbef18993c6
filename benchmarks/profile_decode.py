"""Where a SmolLM2 decode step's time goes: per-op self CPU time, and the host time no op accounts for.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_decode.py [--schemes 8da4w] [--modes eager]

For each scheme and mode (``eager`` / ``compiled``: ``compile_for_cpu``, regional, with Inductor's
per-kernel profiling on so that its generated kernels show up as rows), the deployed model
(``lowbit.eval.deploy``) decodes greedily after a 64-token prompt: the median of 16 decode steps, then 8
steps under ``torch.profiler`` with the ops' self time. The step time minus the ops' self time per step is
host time spent outside ATen (Python, module calls).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lowbit.eval import compile_for_cpu, deploy
from lowbit.eval.bench import cpu_description
from lowbit.eval.generate import Generator
from lowbit.models.checkpoint import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="8da4w")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--rows", type=int, default=18)
    a = ap.parse_args()
    print(f"threads {torch.get_num_threads()}; {cpu_description()}")
    base, _, _ = load_checkpoint("smollm2-135m")
    prompt = torch.randint(0, base.tok_embeddings.num_embeddings, (1, 64),
                           generator=torch.Generator().manual_seed(0))
    for scheme in a.schemes.split(","):
        for mode in a.modes.split(","):
            model = deploy(copy.deepcopy(base), scheme)
            if mode == "compiled":
                model = compile_for_cpu(model, flags={"cpp.enable_kernel_profile": True})
            gen = Generator(model, 1, 64 + 40)
            with torch.no_grad():
                t = time.perf_counter()
                gen.reset()
                tok = gen.prefill(prompt).argmax(-1, keepdim=True)
                for _ in range(4):
                    tok = gen.step(tok).argmax(-1, keepdim=True)
                warmup = time.perf_counter() - t
                gen.reset()
                tok = gen.prefill(prompt).argmax(-1, keepdim=True)
                steps = []
                for _ in range(16):
                    t = time.perf_counter()
                    tok = gen.step(tok).argmax(-1, keepdim=True)
                    steps.append(time.perf_counter() - t)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(8):
                        tok = gen.step(tok).argmax(-1, keepdim=True)
            step_ms = 1e3 * sorted(steps)[len(steps) // 2]
            ops_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / 8
            print(f"\n{scheme} {mode}: warm-up {warmup:.1f} s, decode step {step_ms:.2f} ms (median of 16); "
                  f"ATen ops' self time {ops_ms:.2f} ms/step under the profiler")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows,
                                            max_name_column_width=55))
            del model, gen


if __name__ == "__main__":
    main()
