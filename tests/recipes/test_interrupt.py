"""Ctrl-C while a checkpoint is being written: the write completes, the run stops with the documented
message (exit status 130 from the command line), and no temporary directory is left.

The SIGINT is a real signal, raised from inside DCP's file writer (where the user's Ctrl-C lands in
practice: DCP wraps any exception of its writers, KeyboardInterrupt included, in CheckpointException).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

from lowbit.models.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from lowbit.recipes.runner import run_recipe

ROOT = Path(__file__).resolve().parents[2]


def sigint_while_writing(monkeypatch, checkpoint: str, presses: int = 1) -> list:
    """Send SIGINT ``presses`` times (once per item) while DCP writes the files of ``checkpoint``."""
    real = dcp_fs._write_item
    sent = []

    def write_item(transforms, stream, *args, **kwargs):
        if f".tmp-{checkpoint}" in str(getattr(stream, "name", "")) and len(sent) < presses:
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    return sent


@pytest.fixture(autouse=True)
def terminal_sigint():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even if this process was started with SIGINT
    ignored (a background job of a shell without job control)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _child_sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def no_temporary_dirs(run: Path) -> bool:
    return not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_ctrl_c_during_a_write_finishes_it_then_stops(tmp_path, small_run, monkeypatch):
    args = [*small_run, "max_steps=6", "checkpoint_every=2"]
    sent = sigint_while_writing(monkeypatch, "step_000004")
    with pytest.raises(KeyboardInterrupt) as e:
        run_recipe("finetune_recipe", "tiny_pretrain", args)
    run = tmp_path / "run"
    assert len(sent) == 1
    assert str(e.value) == ("interrupted at step 4; last complete checkpoint: "
                            f"{run / 'checkpoints' / 'step_000004'} (continue with resume=true)")
    assert [c.name for c in list_checkpoints(run)] == ["step_000002", "step_000004"]
    assert no_temporary_dirs(run)
    verify_checkpoint(list_checkpoints(run)[-1], training_state=True)  # complete, checksums match
    monkeypatch.undo()
    done = run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true"])
    assert done.step == 6


def test_second_ctrl_c_abandons_the_write(tmp_path, small_run, monkeypatch):
    args = [*small_run, "max_steps=6", "checkpoint_every=2"]
    sigint_while_writing(monkeypatch, "step_000004", presses=2)
    with pytest.raises(KeyboardInterrupt,
                       match=r"interrupted at step 4; last complete checkpoint: .*step_000002 "):
        run_recipe("finetune_recipe", "tiny_pretrain", args)
    run = tmp_path / "run"
    assert [c.name for c in list_checkpoints(run)] == ["step_000002"] and no_temporary_dirs(run)
    assert load_checkpoint(run)[2]["step"] == 2


def test_an_ignored_sigint_stays_ignored(tmp_path, small_run, monkeypatch):
    """Started with SIGINT ignored (``nohup``, a background job): a stray SIGINT does not stop the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sent = sigint_while_writing(monkeypatch, "step_000002")
    done = run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=2"])
    assert len(sent) == 1 and done.step == 2
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_command_line_exits_130_with_the_message_as_last_line(tmp_path):
    """A real `lowbit run` process: Ctrl-C during the step-2 write, status 130, the cause on the last line."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import signal\n"
        "import torch.distributed.checkpoint.filesystem as fs\n"
        "real = fs._write_item\n"
        "sent = []\n"
        "def write_item(*args, **kwargs):\n"
        "    if not sent:\n"
        "        sent.append(1)\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "    return real(*args, **kwargs)\n"
        "fs._write_item = write_item\n"
    )
    from tests.conftest import SMALL_RUN

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "run", "finetune_recipe", "--config",
                           "tiny_pretrain", *SMALL_RUN, "max_steps=4", "checkpoint_every=2",
                           f"output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=_child_sigint_default)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lowbit: interrupted at step 2; last complete checkpoint: {out / 'checkpoints' / 'step_000002'} "
        "(continue with resume=true)")
    assert "Traceback" not in proc.stderr
    assert [c.name for c in list_checkpoints(out)] == ["step_000002"] and no_temporary_dirs(out)


def test_kill_9_during_a_write_then_resume_reproduces_the_uninterrupted_losses(tmp_path, small_run):
    """SIGKILL (no handler runs) while DCP writes step 4: step 2 stays intact, the leftover temporary
    directory is removed by the next start, and resume=true gives the losses of an uninterrupted run."""
    import json

    import torch

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "import torch.distributed.checkpoint.filesystem as fs\n"
        "real = fs._write_item\n"
        "def write_item(transforms, stream, *args, **kwargs):\n"
        "    if '.tmp-step_000004' in str(getattr(stream, 'name', '')):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(transforms, stream, *args, **kwargs)\n"
        "fs._write_item = write_item\n"
    )
    args = [*small_run, "max_steps=6", "checkpoint_every=2"]
    out = tmp_path / "run"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "run", "finetune_recipe", "--config",
                           "tiny_pretrain", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=_child_sigint_default)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [c.name for c in list_checkpoints(out)] == ["step_000002"]
    assert (out / "checkpoints" / ".tmp-step_000004").exists()  # what the killed write left behind

    resumed = run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true"])
    full = run_recipe("finetune_recipe", "tiny_pretrain",
                      [*small_run, "max_steps=6", f"output_dir={tmp_path / 'full'}"])
    assert resumed.step == 6 and no_temporary_dirs(out)
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(full.losses, abs=1e-6) and len(logged) == 6
