"""One run per output_dir: a second run is refused unless resume=true or overwrite=true; resume refuses a
changed config; keep_last only prunes the current run's checkpoints."""

import json
import shutil

import pytest

from lowbit.models.checkpoint import list_checkpoints, load_checkpoint
from lowbit.recipes.config import ConfigError
from lowbit.recipes.runner import run_recipe


def steps_logged(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def names(run_dir):
    return [c.name for c in list_checkpoints(run_dir)]


def test_a_second_run_in_the_same_output_dir_never_mixes_with_the_first(tmp_path, small_run):
    run = tmp_path / "run"
    first = run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=6", "checkpoint_every=2",
                                                           "keep_last=3"])
    assert names(run) == ["step_000002", "step_000004", "step_000006"]
    second = [*small_run, "max_steps=4", "checkpoint_every=2", "keep_last=2", "optimizer.lr=1e-5"]

    # 1. no resume, no overwrite: refused, naming the directory and both ways out; nothing touched
    with pytest.raises(ConfigError) as e:
        run_recipe("finetune_recipe", "tiny_pretrain", second)
    msg = str(e.value)
    assert f"output_dir {run} already holds a run" in msg and "step_000006" in msg and "6 logged steps" in msg
    assert "resume=true" in msg and "overwrite=true" in msg
    assert names(run) == ["step_000002", "step_000004", "step_000006"]
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]

    # 2. resume=true with another learning rate: refused, naming the key and both values
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in optimizer\.lr "
                                          r"\(checkpoint 0\.003, this run 1e-05\)\. "
                                          r"Only \[.*'max_steps'.*\] may change on resume"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*second, "resume=true"])

    # 3. overwrite=true: the new run alone in the directory
    new = run_recipe("finetune_recipe", "tiny_pretrain", [*second, "overwrite=true"])
    assert names(run) == ["step_000002", "step_000004"] and steps_logged(run) == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["final_loss"] == new.losses[-1]
    _, _, meta = load_checkpoint(run)  # what `lowbit eval --checkpoint RUN` scores
    assert meta["step"] == 4 and meta["config"]["optimizer"]["lr"] == 1e-5
    identity = json.loads((run / "run.json").read_text())
    assert identity["run_id"] == meta["run_id"] and identity["seed"] == 0
    assert new.losses[0] == first.losses[0]  # same init and data; the lr differs from step 1's update on

    # 4. resume=true with only resumable keys changed continues; keep_last prunes only this run's checkpoints
    foreign = run / "checkpoints" / "step_000001"
    shutil.copytree(run / "checkpoints" / "step_000002", foreign)
    meta_file = foreign / "lowbit.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "run_id": "another-run"}))
    (foreign / "checksums.json").unlink()
    run_recipe("finetune_recipe", "tiny_pretrain", [*second, "resume=true", "max_steps=6", "log_every=2"])
    assert names(run) == ["step_000001", "step_000004", "step_000006"]
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_resume_and_overwrite_together_is_refused(small_run):
    with pytest.raises(ConfigError, match="resume=true and overwrite=true contradict each other"):
        run_recipe("finetune_recipe", "tiny_pretrain",
                   [*small_run, "max_steps=1", "resume=true", "overwrite=true"])
