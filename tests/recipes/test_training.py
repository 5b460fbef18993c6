import json
import subprocess
import sys

import pytest
import torch

from lowbit.models.checkpoint import list_checkpoints, load_checkpoint
from lowbit.recipes.finetune_recipe import FinetuneRecipe
from lowbit.recipes.runner import run_recipe


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(tmp_path, small_run):
    full = run_recipe(
        "finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=8", f"output_dir={tmp_path / 'a'}"]
    )
    part = [*small_run, "max_steps=8", "checkpoint_every=4", f"output_dir={tmp_path / 'b'}"]

    class StopAtSix(FinetuneRecipe):
        def on_step_start(self, step):
            if step == 6:
                raise KeyboardInterrupt  # as if Ctrl-C during step 6

    from lowbit.recipes.config import load_config
    from lowbit.recipes.training import run

    with pytest.raises(KeyboardInterrupt):
        run(StopAtSix, load_config("tiny_pretrain", part))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_000004"]
    resumed = run_recipe("finetune_recipe", "tiny_pretrain", [*part, "resume=true"])
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)
    assert len(losses(tmp_path / "b")) == 8


def test_interrupt_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, small_run, monkeypatch):
    args = [*small_run, "max_steps=4", "checkpoint_every=2"]
    run_recipe("finetune_recipe", "tiny_pretrain", [*args, "max_steps=2"])
    from lowbit.recipes import checkpointing

    real_save = checkpointing.save_model_dir

    def interrupted_save(*a, **k):  # the sharded state is written, the model files half-way
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "save_model_dir", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true"])
    monkeypatch.setattr(checkpointing, "save_model_dir", real_save)
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000002"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    model, _, meta = load_checkpoint(run_dir)
    assert meta["step"] == 2
    done = run_recipe("finetune_recipe", "tiny_pretrain", [*args, "resume=true"])
    assert done.step == 4 and len(losses(run_dir)) == 4


def test_training_on_user_jsonl_data_and_finetuning_from_checkpoint(tmp_path, small_run):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"record {i}: the quick brown fox {i % 7}"}) + "\n" for i in range(300))
    )
    base = run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=3", f"data.source={data}"])
    assert base.losses[-1] < base.losses[0]
    ft = run_recipe("finetune_recipe", "tiny_pretrain", [
        *small_run, "max_steps=2", f"data.source={data}", f"base_checkpoint={base.output_dir}",
        f"output_dir={tmp_path / 'ft'}",
    ])
    assert ft.losses[0] < base.losses[0]  # starts from the trained weights
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=1", f"data.source={bad}",
                                                         f"output_dir={tmp_path / 'bad'}"])


def test_tune_run_and_lowbit_run_entry_points(tmp_path, small_run):
    """The recipe runs through torchtune's own `tune run` and through `lowbit run` (by names)."""
    args = [a for a in small_run if not a.startswith("output_dir")]
    for name, cmd in {
        "tune": [sys.executable, "-m", "torchtune._cli.tune", "run", "lowbit/recipes/finetune_recipe.py",
                 "--config", "lowbit/recipes/configs/tiny_pretrain.yaml"],
        "lowbit": [sys.executable, "-m", "lowbit.cli", "run", "finetune_recipe", "--config", "tiny_pretrain"],
    }.items():
        out = tmp_path / name
        subprocess.run([*cmd, *args, "max_steps=2", f"output_dir={out}"], check=True, capture_output=True,
                       cwd=__file__.rsplit("/tests/", 1)[0])
        assert list_checkpoints(out)[-1].name == "step_000002"


def test_float8_grad_output_dtype_from_config(tmp_path, small_run):
    """``float8.grad_output_dtype`` reaches every Float8Linear; a bad value fails naming the option."""
    from lowbit.float8 import Float8Linear

    base = [*small_run, "max_steps=1", "checkpoint_every=0", "float8.recipe=rowwise"]
    run = run_recipe("finetune_recipe", "tiny_pretrain", [*base, "float8.grad_output_dtype=e5m2"])
    layers = [m for m in run.model.modules() if isinstance(m, Float8Linear)]
    assert layers and all(m.config.grad_output_float8_dtype == torch.float8_e5m2 for m in layers)
    with pytest.raises(ValueError, match="grad_output_dtype"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*base, "float8.grad_output_dtype=e3m4"])


def test_float8_fsdp_keys_are_checked(small_run):
    """The float8 all-gather keys are recipe keys; precomputing scales without the all-gather says why."""
    from lowbit.recipes.config import ConfigError

    base = [
        *small_run,
        "max_steps=1",
        "checkpoint_every=0",
        "float8.recipe=tensorwise",
        "float8.emulate=true",
    ]
    with pytest.raises(ConfigError, match="precompute_float8_scales_for_fsdp.*enable_fsdp_float8_all_gather"):
        run_recipe(
            "finetune_recipe", "tiny_pretrain", [*base, "float8.precompute_float8_scales_for_fsdp=true"]
        )
    with pytest.raises(ConfigError, match="enable_fsdp_float8_all_gather.*tensorwise"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*base, "float8.recipe=rowwise",
                                                         "float8.enable_fsdp_float8_all_gather=true"])
