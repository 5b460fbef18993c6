import json

import pytest

from lowbit import demo
from lowbit.cli import main as lowbit_main
from tests.conftest import SMALL_RUN


@pytest.mark.slow  # ~40 s: a whole tiny demo (pretrain, lm-eval, one arm); CI runs it in `make test-slow`
def test_demo_runs_an_arm_and_reports_the_measured_figures(tmp_path):
    """The base run and the float8 arm (the cheapest: two short trainings) on a small model; every
    figure in the report is read back from the runs' own files."""
    result = demo.run_demo(tmp_path, steps=3, arm_steps=2, arms=["float8"], num_items=8, overrides=SMALL_RUN)
    report = (tmp_path / "report.md").read_text()
    base = result["base"]
    assert result["failures"] == []
    assert base["train_tokens"] == 3 * 4 * 32  # steps x batch_size x seq_len of SMALL_RUN
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert base["final_loss"] == summary["final_loss"] and summary["step"] == 3
    results = json.loads((tmp_path / "base" / "eval" / "results.json").read_text())
    assert base["acc_norm"] == results["results"]["hellaswag_local"]["acc_norm,none"]
    assert f"{100 * base['acc_norm']:.2f}" in report and f"{base['train_tokens']:,}" in report
    # the arm: its section, its rows (no float8 and tensorwise, 2 steps each) and its plot entry
    rows = json.loads((tmp_path / "float8.json").read_text())
    assert [r["name"] for r in rows] == ["no float8", "float8 tensorwise"]
    for r in rows:
        metrics = tmp_path / "float8" / r["name"].replace(" ", "_") / "metrics.jsonl"
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
        assert len(losses) == 2 and r["final_loss"] == pytest.approx(sum(losses) / 2)
    assert "## float8" in report and "| float8 tensorwise |" in report
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_demo_rejects_unknown_arms(capsys):
    with pytest.raises(SystemExit):
        lowbit_main(["demo", "--model", "tiny", "--arms", "optim,warp"])
    assert "unknown arm(s) ['warp']" in capsys.readouterr().err


def test_smollm2_demo_rejects_tiny_only_flags(capsys):
    with pytest.raises(SystemExit):
        lowbit_main(["demo", "--arms", "optim"])
    assert "--steps and --arms go with --model tiny" in capsys.readouterr().err
