"""The demo's optimizer arm on a very small model: each row reports its own run.

lm-eval costs ~25 s per call on this machine and is tested in tests/eval, so ``evaluate`` is replaced by
a stand-in that records which checkpoint it was given; everything else is real and checked against what
the runs wrote (metrics.jsonl) and against the state layout computed from the parameter shapes.
"""

import json
import math
from pathlib import Path

from lowbit.data.synthetic import generate_hellaswag, write_jsonl
from tests.conftest import SMALL_RUN

STEPS = 25  # more than the 20-step window of final_loss


def _expected_state_bytes(shapes, fmt: str) -> int:
    """State bytes from the documented layout: torch AdamW fp32 m, v and a 4-byte step per parameter;
    AdamW4bit: tensors >= 4096 elements hold two packed 4-bit code arrays and two fp32 scales per
    128-element block, smaller ones fp32 m and v."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if fmt == "4bit" and n >= 4096:
            total += 2 * math.ceil(n / 2) + 2 * 4 * math.ceil(n / 128) + 4
        else:
            total += 8 * n + 4
    return total


def test_run_optim_arm_rows(tmp_path, monkeypatch):
    import lowbit.eval
    from lowbit.demo.optim_arm import OPTIMIZERS, run_optim_arm

    assert OPTIMIZERS == {
        "AdamW (fp32)": "torch.optim.AdamW",
        "AdamW8bit": "lowbit.optim.AdamW8bit",
        "AdamW4bit": "lowbit.optim.AdamW4bit",
    }
    two = {k: OPTIMIZERS[k] for k in ("AdamW (fp32)", "AdamW4bit")}  # the third run would only add time

    accuracy = {}

    def stand_in_evaluate(checkpoint, *, task_file=None, limit=None, **kw):
        assert Path(task_file) == eval_file and (Path(checkpoint) / "summary.json").exists()
        accuracy[Path(checkpoint)] = 0.25 + 0.01 * len(accuracy)
        return {"results": {"hellaswag_local": {"acc_norm,none": accuracy[Path(checkpoint)]}}}

    monkeypatch.setattr(lowbit.eval, "evaluate", stand_in_evaluate)
    eval_file = write_jsonl(generate_hellaswag(num_items=6, seed=0), tmp_path / "eval.jsonl")
    out = run_optim_arm(
        tmp_path, eval_file, [*SMALL_RUN, f"max_steps={STEPS}", "checkpoint_every=0"], optimizers=two
    )
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["AdamW (fp32)", "AdamW4bit"]

    runs = {"AdamW (fp32)": tmp_path / "adamw", "AdamW4bit": tmp_path / "adamw4bit"}
    logged = {}
    for name, run in runs.items():
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == STEPS
        logged[name] = losses
        row = rows[name]
        assert row["final_loss"] == sum(losses[-20:]) / 20  # the run's own last 20 logged losses
        assert row["acc_norm"] == accuracy[run]  # each row carries its own checkpoint's evaluation
        assert row["step_ms"] > 0 and row["optim_step_ms"] > 0
    # same seed and data: the first loss (before any optimizer step) is the same, then the optimizers differ
    assert logged["AdamW4bit"][0] == logged["AdamW (fp32)"][0]
    assert logged["AdamW4bit"][1:] != logged["AdamW (fp32)"][1:]
    assert (
        rows["AdamW4bit"]["loss_vs_adamw"]
        == rows["AdamW4bit"]["final_loss"] / rows["AdamW (fp32)"]["final_loss"] - 1
    )

    # state memory: exactly the layout of each optimizer over the model's parameter shapes
    from lowbit.models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(runs["AdamW4bit"])  # the trained model's shapes
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    n = sum(math.prod(s) for s in shapes)
    for name, fmt in (("AdamW (fp32)", "fp32"), ("AdamW4bit", "4bit")):
        assert rows[name]["state_bytes_per_param"] == _expected_state_bytes(shapes, fmt) / n, name
    assert any(math.prod(s) >= 4096 for s in shapes)  # the 4-bit run quantized something
    assert out["markdown"].count("\n") == 3 and "| AdamW4bit |" in out["markdown"]
