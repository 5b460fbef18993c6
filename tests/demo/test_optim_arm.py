"""The demo's optimizer arm, lightly: a few steps per optimizer on a very small model.

lm-eval costs ~25 s per call on this machine and is tested in tests/eval, so ``evaluate`` is
replaced by a recorder here; the arm's training, state accounting and table are real.
"""

import pytest

from lowbit.data.synthetic import generate_hellaswag, write_jsonl
from tests.conftest import SMALL_RUN


def test_run_optim_arm_rows(tmp_path, monkeypatch):
    import lowbit.eval
    from lowbit.demo.optim_arm import OPTIMIZERS, run_optim_arm

    assert OPTIMIZERS == {"AdamW (fp32)": "torch.optim.AdamW", "AdamW8bit": "lowbit.optim.AdamW8bit",
                          "AdamW4bit": "lowbit.optim.AdamW4bit"}
    two = {k: OPTIMIZERS[k] for k in ("AdamW (fp32)", "AdamW4bit")}  # the third run would only add time

    calls = []

    def fake_evaluate(checkpoint, *, task_file=None, limit=None, **kw):
        calls.append((checkpoint, task_file))
        return {"results": {"hellaswag_local": {"acc_norm,none": 0.25 + 0.01 * len(calls)}}}

    monkeypatch.setattr(lowbit.eval, "evaluate", fake_evaluate)
    eval_file = write_jsonl(generate_hellaswag(num_items=6, seed=0), tmp_path / "eval.jsonl")
    out = run_optim_arm(tmp_path, eval_file, [*SMALL_RUN, "max_steps=3", "checkpoint_every=0"], optimizers=two)
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["AdamW (fp32)", "AdamW4bit"]
    assert [c[1] for c in calls] == [eval_file] * 2 and len({str(c[0]) for c in calls}) == 2
    assert [r["acc_norm"] for r in rows.values()] == pytest.approx([0.26, 0.27])
    for r in rows.values():
        assert set(r) >= {"name", "final_loss", "acc_norm", "state_bytes_per_param", "step_ms"}
        assert r["final_loss"] > 0 and r["step_ms"] > 0
    # same seed and data: the first step's loss is identical across optimizers, later ones differ
    assert rows["AdamW4bit"]["final_loss"] != rows["AdamW (fp32)"]["final_loss"]
    # fp32 AdamW keeps 8 B/param; the embedding (>= 4096 elements) is quantized in the low-bit run
    assert rows["AdamW (fp32)"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert rows["AdamW4bit"]["state_bytes_per_param"] < 4.0
    assert out["markdown"].count("\n") == 3 and "AdamW4bit" in out["markdown"]
