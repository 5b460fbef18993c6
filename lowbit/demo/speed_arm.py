"""The speed arm of ``lowbit demo``: CPU decode / prefill throughput per inference scheme.

Opt-in (``lowbit demo --arms ...,speed``): it compiles a 168M-parameter preset once per scheme and times
it. ``lowbit bench`` measures the same rows on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lowbit.eval.bench import bench_rows, markdown_table, parse_schemes
from lowbit.eval.plots import plot_bars


def run_speed_arm(model_or_preset: str | nn.Module, schemes: list[str] | str, workdir: str | Path, *,
                  modes=("compiled",), prompt_len: int = 32, decode_tokens: int = 16, repeats: int = 2,
                  baseline: bool = True, log=print) -> dict:
    """The demo's speed section: bench ``schemes``, write ``speed.json``, ``speed.md``, ``decode_tok_s.png``.

    Args:
        model_or_preset: a float model, a preset name or a checkpoint dir.
        schemes: names (list or comma-separated) from ``none, 8w, 8da8w, 4w, 8da4w``.
        workdir: output directory (created).
        modes: ``("compiled",)``, ``("eager",)`` or both.
        baseline: prepend the fp32/float eager ``none`` row (the reference for ``speedup``).

    Returns:
        ``{"rows": [...], "markdown": str, "plot": path, "description": str}``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    schemes = parse_schemes(schemes if isinstance(schemes, str) else ",".join(schemes))
    rows, desc = [], ""
    if baseline:
        rows, desc = bench_rows(model_or_preset, ["none"], modes=("eager",), prompt_len=prompt_len,
                                decode_tokens=decode_tokens, repeats=repeats, log=log)
    more, desc = bench_rows(model_or_preset, schemes, modes=modes, prompt_len=prompt_len,
                            decode_tokens=decode_tokens, repeats=repeats, log=log)
    rows += more
    for r in rows:
        r["speedup"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    md = (f"Decode / prefill throughput on CPU ({desc}; prompt {prompt_len} tokens, {decode_tokens} decode "
          f"steps, batch 1; speedup = decode tok/s over the first row).\n\n" + markdown_table(rows))
    plot = plot_bars({f"{r['scheme']} {r['mode']}": r["decode_tok_s"] for r in rows},
                     "CPU decode throughput per scheme", "decode tokens/s", workdir / "decode_tok_s.png")
    (workdir / "speed.json").write_text(json.dumps({"description": desc, "rows": rows}, indent=2))
    (workdir / "speed.md").write_text(md + "\n")
    return {"rows": rows, "markdown": md, "plot": str(plot), "description": desc}
