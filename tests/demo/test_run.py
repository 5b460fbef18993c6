import pytest

from lowbit import demo
from lowbit.cli import main as lowbit_main


def test_demo_writes_a_report_with_the_measured_figures(tmp_path):
    result = demo.run_demo(tmp_path, steps=3, arms=[], num_items=16)
    report = (tmp_path / "report.md").read_text()
    base = result["base"]
    assert base["train_tokens"] == 3 * 16 * 128
    assert f"{100 * base['acc_norm']:.2f}" in report and f"{base['train_tokens']:,}" in report
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "base" / "eval" / "results.json").exists()


def test_demo_rejects_unknown_arms(capsys):
    with pytest.raises(SystemExit):
        lowbit_main(["demo", "--arms", "optim,warp"])
    assert "unknown arm(s) ['warp']" in capsys.readouterr().err
