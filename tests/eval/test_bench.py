"""Throughput bench: metrics are consistent, CLI outputs, bad input (eager only: fast)."""

import json

import pytest
import torch

from lowbit.cli import main as lowbit_main
from lowbit.eval.bench import bench_model, markdown_table, parse_schemes
from lowbit.models import build_model


def test_bench_model_metrics_are_consistent():
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=1).eval()
    r = bench_model(model, prompt_len=8, decode_tokens=4, repeats=2)
    assert r["decode_tok_s"] == pytest.approx(1e3 / r["decode_ms"])
    assert r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 and r["peak_rss_mb"] > 10
    # time to first token includes the whole prefill forward
    assert r["ttft_ms"] >= 1e3 * 8 / r["prefill_tok_s"] * 0.999
    assert r["kernel_ms"] > 0 and r["host_ms"] >= 0
    assert r["host_ms"] + r["kernel_ms"] >= r["decode_ms"] * 0.999


def test_cli_writes_rows_and_says_random_weights(tmp_path, capsys):
    rc = lowbit_main(["bench", "--preset", "tiny", "--schemes", "none,8w", "--eager", "--prompt-len", "8", "--decode-tokens", "3",
               "--repeats", "1", "--no-profile", "--output", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "random-weight" in out and "| none | eager | float32 |" in out and "| 8w | eager | bfloat16 |" in out
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
           "peak_rss_mb": 400.0}
    lines = markdown_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 12
    assert "| 4w | compiled | bfloat16 | 10.00 | 2.00x | 100.0 | 5.0 | - | 1.50 | 3.0 | 400 |" == lines[2]
