"""The real-model demo (what `make demo` runs), at the smallest sizes: every arm runs and reports."""

import json

import pytest

from lowbit.demo.smollm2 import run_smollm2_demo


@pytest.mark.slow  # loads SmolLM2 five times and writes two QAT checkpoints: minutes on 2 cores
def test_smollm2_demo_runs_every_arm(tmp_path):
    result = run_smollm2_demo(tmp_path, items=8, kl_windows=1, qat_steps=1, qat_batch_size=1, qat_seq_len=32)
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["float", "PTQ 8da4w g32", "PTQ 4w g64", "QAT 8da4w g32", "QAT 4w g64"]
    assert rows["float"]["kl_mean"] == 0 and rows["float"]["top1_agreement"] == 1
    for name in ("PTQ 8da4w g32", "PTQ 4w g64"):  # PTQ costs this real model something
        assert rows[name]["kl_mean"] > 0.05 and rows[name]["ppl"] > rows["float"]["ppl"]
    for name in ("QAT 8da4w g32", "QAT 4w g64"):  # deployed with the scheme the checkpoint records
        assert rows[name]["scheme"] == name.split()[1] and rows[name]["qat_tokens"] == 32
        assert rows[name]["kl_mean"] > 0
    assert all(r["items"] == 8 and r["decode_tok_s"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]
    report = (tmp_path / "report.md").read_text()
    assert f"| PTQ 8da4w g32 | {rows['PTQ 8da4w g32']['ppl']:.2f} |" in report
    assert (tmp_path / "smollm2.png").stat().st_size > 10_000
