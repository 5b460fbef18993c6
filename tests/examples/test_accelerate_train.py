"""examples/accelerate_train.py: lowbit's optimizers, QAT and float8 in a plain accelerate loop."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "accelerate_train.py"
SMALL = ["--dim", "64", "--num-docs", "256", "--seq-len", "32"]


def train(out, *args, processes=1):
    launch = (
        [sys.executable, str(SCRIPT)]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--cpu",
            str(SCRIPT),
        ]
    )
    proc = subprocess.run([*launch, "--output-dir", str(out), *SMALL, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        pytest.fail(f"accelerate_train.py failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def crash_after_first_save(src, dst):
    """A copy of run ``src`` as if it had died right after its first ``save_state``."""
    shutil.copytree(src, dst)
    saves = sorted(dst.glob("state_step_*"))
    for extra in saves[1:]:
        shutil.rmtree(extra)
    return dst


@pytest.mark.slow  # ~50 s for both: accelerate launches; CI runs them in `make test-slow`
@pytest.mark.parametrize("processes,args", [
    (1, ["--optimizer", "adamw8bit", "--qat", "8da4w", "--grad-accum", "2", "--batch-size", "4"]),
    (2, ["--optimizer", "adamw4bit", "--float8", "tensorwise", "--grad-accum", "1", "--batch-size", "2"]),
])
def test_save_state_load_state_resumes_exactly(processes, args, tmp_path):
    full = train(tmp_path / "full", "--steps", "6", "--save-every", "3", *args, processes=processes)
    assert len(full) == 6 and full[-1] < full[0]
    resumed_dir = crash_after_first_save(tmp_path / "full", tmp_path / "resumed")
    resumed = train(resumed_dir, "--steps", "6", "--save-every", "3", "--resume", *args, processes=processes)
    assert resumed == full  # same process count, same reduction order: bit-identical losses
    state = resumed_dir / "state_step_000006"
    assert (state / "optimizer.bin").exists() and (state / "model.safetensors").exists()
