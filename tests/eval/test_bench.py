"""Throughput bench: figures from a known clock, a real model, CLI outputs, bad input (eager only: fast)."""

import json
import time

import pytest
import torch

from lowbit.cli import main as lowbit_main
from lowbit.eval.bench import bench_model, markdown_table, parse_schemes
from lowbit.models import build_model


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_bench_model_figures_from_a_known_clock(monkeypatch):
    """A generator whose prefill takes 0.5 s and whose decode steps take 0.1 s on a fake clock gives
    exactly the figures the definitions say: B*P / 0.5 prefill tok/s, 500 ms to the first token, B / 0.1
    decode tok/s."""
    import types

    import lowbit.eval.bench as bench

    clock = _FakeClock()
    calls = []

    class FakeGenerator:
        def __init__(self, model, batch_size, max_len):
            self.b = batch_size

        def reset(self):
            calls.append("reset")

        def prefill(self, prompt):
            clock.now += 0.5
            calls.append(("prefill", tuple(prompt.shape)))
            return torch.zeros(self.b, 16)

        def step(self, tok):
            clock.now += 0.1
            calls.append(("step", tuple(tok.shape)))
            return torch.zeros(self.b, 16)

    monkeypatch.setattr(bench, "Generator", FakeGenerator)
    monkeypatch.setattr(
        bench, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, sleep=time.sleep)
    )
    r = bench.bench_model(torch.nn.Identity(), prompt_len=8, decode_tokens=3, batch_size=2, repeats=2,
                          vocab_size=16, profile=False)
    assert r["prefill_tok_s"] == pytest.approx(2 * 8 / 0.5)
    assert r["ttft_ms"] == pytest.approx(500.0)
    assert r["decode_ms"] == pytest.approx(100.0)
    assert r["decode_tok_s"] == pytest.approx(2 / 0.1)
    assert r["host_ms"] is None and r["kernel_ms"] is None
    # one warm-up run, then `repeats` timed runs: each a prefill of the (B, P) prompt and 3 decode steps
    assert calls.count("reset") == 3
    assert calls.count(("prefill", (2, 8))) == 3 and calls.count(("step", (2, 1))) == 9


def test_bench_model_on_a_real_model_profiles_its_kernels():
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=1).eval()
    r = bench_model(model, prompt_len=8, decode_tokens=4, repeats=2)
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_ms"] > 0
    assert r["peak_rss_mb"] > 10  # the process, torch included
    assert r["kernel_ms"] > 0 and r["host_ms"] >= 0


def test_cli_writes_rows_and_says_random_weights(tmp_path, capsys):
    rc = lowbit_main(
        [
            "bench",
            "--preset",
            "tiny",
            "--schemes",
            "none,8w",
            "--eager",
            "--prompt-len",
            "8",
            "--decode-tokens",
            "3",
            "--repeats",
            "1",
            "--no-profile",
            "--output",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert (
        "random-weight" in out and "| none | eager | float32 |" in out and "| 8w | eager | bfloat16 |" in out
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["scheme"], r["mode"]) for r in data["rows"]] == [("none", "eager"), ("8w", "eager")]
    assert data["rows"][0]["speedup"] == 1.0
    assert data["rows"][1]["model_mb"] < data["rows"][0]["model_mb"]  # int8 weights + bf16 rest
    assert (tmp_path / "bench.md").read_text().startswith("preset tiny")


def test_cli_bad_input(capsys):
    assert lowbit_main(["bench", "--preset", "tiny", "--schemes", "none,int3"]) == 2
    assert "int3" in capsys.readouterr().out
    assert lowbit_main(["bench", "--preset", "no_such_preset", "--schemes", "none", "--eager"]) == 2
    assert "no_such_preset" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lowbit_main(["bench", "--preset", "tiny", "--checkpoint", "x"])
    with pytest.raises(ValueError, match="empty"):
        parse_schemes(" , ")


def test_markdown_table_columns():
    row = {"scheme": "4w", "mode": "compiled", "dtype": "bfloat16", "decode_tok_s": 10.0, "speedup": 2.0,
           "prefill_tok_s": 100.0, "ttft_ms": 5.0, "host_ms": None, "kernel_ms": 1.5, "model_mb": 3.0,
           "peak_rss_mb": 400.0, "warmup_s": 61.25}
    lines = markdown_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert lines[2] == ("| 4w | compiled | bfloat16 | 10.00 | 2.00x | 100.0 | 5.0 | - | 1.50 | 3.0 | 400 | "
                        "61.2 |")


def test_cpu_description_lists_the_cpus_vector_flags(monkeypatch, tmp_path):
    import lowbit.eval.bench as lb

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_bf16 amx_tile bmi2\n")
    real_path = lb.Path
    monkeypatch.setattr(lb, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert lb.cpu_description() == "Test CPU 9000; ISA: amx_tile avx2 avx512_bf16 avx512f f16c fma"
    monkeypatch.setattr(lb, "Path", lambda p: real_path(tmp_path / "missing"))
    assert lb.cpu_description() == "unknown CPU; ISA: unknown"
