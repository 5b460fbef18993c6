"""The demo's optimizer arm on a very small model, against figures computed here from the runs' own
files and the documented state formats.

lm-eval costs ~25 s per call on this machine and is tested in tests/eval (and through the whole demo
in tests/demo/test_run.py), so ``evaluate`` is replaced by a recorder here: the test checks that each
run's checkpoint is the one evaluated and that the row carries its acc_norm.
"""

import json
import math
from pathlib import Path

import pytest

from lowbit.data.synthetic import generate_hellaswag, write_jsonl
from tests.conftest import SMALL_RUN


def _state_bytes_per_param(params, fmt: str) -> float:
    """Optimizer state bytes per parameter element, from the formats in docs/design.md: torch AdamW keeps
    two fp32 moments; AdamW4bit keeps, for tensors of >= 4096 elements, two moments of packed 4-bit codes
    plus one fp32 scale per 128-element block (smaller tensors: fp32 moments); each has a 4-byte step."""
    total = 0
    for p in params:
        n = p.numel()
        if fmt == "4bit" and n >= 4096:
            total += 2 * (math.ceil(n / 2) + 4 * math.ceil(n / 128)) + 4
        else:
            total += 8 * n + 4
    return total / sum(p.numel() for p in params)


def test_run_optim_arm_rows(tmp_path, monkeypatch):
    import lowbit.eval
    from lowbit.demo.optim_arm import FINAL_WINDOW, OPTIMIZERS, run_optim_arm

    assert OPTIMIZERS == {"AdamW (fp32)": "torch.optim.AdamW", "AdamW8bit": "lowbit.optim.AdamW8bit",
                          "AdamW4bit": "lowbit.optim.AdamW4bit"}
    two = {k: OPTIMIZERS[k] for k in ("AdamW (fp32)", "AdamW4bit")}  # the third run would only add time

    calls = []

    def fake_evaluate(checkpoint, *, task_file=None, limit=None, **kw):
        calls.append((Path(checkpoint), task_file))
        return {"results": {"hellaswag_local": {"acc_norm,none": 0.25 + 0.01 * len(calls)}}}

    monkeypatch.setattr(lowbit.eval, "evaluate", fake_evaluate)
    eval_file = write_jsonl(generate_hellaswag(num_items=6, seed=0), tmp_path / "eval.jsonl")
    out = run_optim_arm(
        tmp_path, eval_file, [*SMALL_RUN, "max_steps=3", "checkpoint_every=0"], optimizers=two
    )
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["AdamW (fp32)", "AdamW4bit"]
    run_dirs = {"AdamW (fp32)": tmp_path / "adamw", "AdamW4bit": tmp_path / "adamw4bit"}
    # each run's directory was evaluated on the arm's file, and its row carries that evaluation's acc_norm
    assert calls == [(run_dirs["AdamW (fp32)"], eval_file), (run_dirs["AdamW4bit"], eval_file)]
    assert [r["acc_norm"] for r in rows.values()] == [0.26, 0.27]

    losses = {}
    for name, run in run_dirs.items():
        losses[name] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        tail = losses[name][-FINAL_WINDOW:]
        assert len(losses[name]) == 3 and rows[name]["final_loss"] == pytest.approx(sum(tail) / len(tail))
        summary = json.loads((run / "summary.json").read_text())
        assert rows[name]["step_ms"] == summary["mean_step_ms"] and rows[name]["optim_step_ms"] > 0
    # same seed, data and initial weights: the first loss is identical; the optimizers then differ
    assert losses["AdamW4bit"][0] == losses["AdamW (fp32)"][0]
    assert losses["AdamW4bit"][1:] != losses["AdamW (fp32)"][1:]
    assert rows["AdamW (fp32)"]["loss_vs_adamw"] == 0.0
    assert rows["AdamW4bit"]["loss_vs_adamw"] == pytest.approx(
        rows["AdamW4bit"]["final_loss"] / rows["AdamW (fp32)"]["final_loss"] - 1)

    # state bytes against the formats, on the model the recipe builds (one run's checkpoint shapes)
    from lowbit.models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(run_dirs["AdamW4bit"])
    params = list(model.parameters())
    assert any(p.numel() >= 4096 for p in params) and any(p.numel() < 4096 for p in params)
    assert rows["AdamW (fp32)"]["state_bytes_per_param"] == pytest.approx(
        _state_bytes_per_param(params, "fp32")
    )
    assert rows["AdamW4bit"]["state_bytes_per_param"] == pytest.approx(_state_bytes_per_param(params, "4bit"))
    assert out["markdown"].count("\n") == 3 and "| AdamW4bit |" in out["markdown"]
