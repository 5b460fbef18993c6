"""Corrupt checkpoint files are detected (checksums) and named; resume falls back to the newest intact
checkpoint; training_state.pt is only ever loaded with weights_only=True."""

import json
import logging

import pytest
import torch

from lowbit.models.checkpoint import list_checkpoints, load_checkpoint, read_meta
from lowbit.models.checksums import CorruptCheckpointError
from lowbit.recipes.checkpointing import load_training_state
from lowbit.recipes.runner import run_recipe


class Opaque:  # an arbitrary pickled object: what weights_only=False would run
    pass


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture
def two_checkpoints(small_run):
    """A run with checkpoints at steps 2 and 4 (and its overrides)."""
    args = [*small_run, "max_steps=4", "checkpoint_every=2", "keep_last=2"]
    done = run_recipe("finetune_recipe", "tiny_pretrain", args)
    assert [c.name for c in list_checkpoints(done.output_dir)] == ["step_000002", "step_000004"]
    return done.output_dir, args


def test_truncated_weights_are_named_by_eval_and_skipped_by_resume(two_checkpoints, caplog, capsys):
    run, args = two_checkpoints
    newest = run / "checkpoints" / "step_000004"
    truncate(newest / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {newest} is corrupt: model\.safetensors "
                                                     r"has 100 bytes, checksums\.json recorded \d+"):
        load_checkpoint(run)
    from lowbit.cli import main  # `lowbit eval --checkpoint RUN`: one line, status 1

    assert main(["eval", "--checkpoint", str(run)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lowbit eval: error: checkpoint {newest} is corrupt: "
                           "model.safetensors has 100 bytes")

    with caplog.at_level(logging.WARNING, logger="lowbit"):
        done = run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true", "max_steps=6"])
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping step_000004" in warned and "model.safetensors has 100 bytes" in warned
    assert "continuing from the newest intact checkpoint" in warned and "step_000002" in warned
    assert done.step == 6 and len(done.losses) == 6
    assert ([json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            == [1, 2, 3, 4, 5, 6])
    assert (run / "checkpoints" / "corrupt-step_000004").is_dir()  # kept for inspection, out of the way
    assert [c.name for c in list_checkpoints(run)] == ["step_000004", "step_000006"]
    assert load_checkpoint(run)[2]["step"] == 6


def test_garbage_training_state_is_called_corrupt_never_unsafe(two_checkpoints, tmp_path):
    run, args = two_checkpoints
    for ckpt in list_checkpoints(run):
        (ckpt / "training_state.pt").write_bytes(b"garbage, not a torch archive")
    with pytest.raises(CorruptCheckpointError) as e:
        run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true", "max_steps=6"])
    assert "no intact checkpoint" in str(e.value) and "step_000004" in str(e.value)
    assert "weights_only" not in str(e.value)

    # a checkpoint without checksums (older lowbit) still goes through the weights_only loader
    state = tmp_path / "training_state.pt"
    state.write_bytes(b"garbage, not a torch archive")
    with pytest.raises(CorruptCheckpointError, match=rf"{state} is corrupt") as e:
        load_training_state(state)
    assert "weights_only" not in str(e.value)

    torch.save({"step": 1, "hook": Opaque()}, state)
    with pytest.raises(CorruptCheckpointError, match=rf"{state} is corrupt") as e:
        load_training_state(state)
    assert "weights_only" not in str(e.value)


def test_garbage_metadata_names_the_file(two_checkpoints):
    run, _ = two_checkpoints
    ckpt = list_checkpoints(run)[-1]
    (ckpt / "lowbit.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {ckpt} is corrupt: lowbit\.json "):
        load_checkpoint(ckpt)
    (ckpt / "checksums.json").unlink()  # without checksums, parsing names it
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {ckpt} is corrupt: lowbit\.json is not "
                                                     r"readable JSON \(JSONDecodeError\)"):
        read_meta(ckpt)
