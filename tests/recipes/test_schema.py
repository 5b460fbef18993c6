"""The typed config schema: a value of the wrong type or out of range fails naming the key, the value,
what was expected and where it came from, before the run builds or writes anything."""

import pytest

from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.finetune_recipe import FinetuneRecipe
from lowbit.recipes.qat_recipe import QATRecipe
from lowbit.recipes.runner import run_recipe

OVERRIDE = "in the command-line override '{}': expected {}, got {}"


@pytest.mark.parametrize("override,expected,got", [
    ("max_steps=2.5", "an int >= 1", "2.5 (float)"),  # trained 3 steps, saved nothing and exited 0
    ("max_steps=abc", "an int >= 1", "'abc' (str)"),
    ("batch_size=0", "an int >= 1", "0 (int)"),
    ("batch_size=-2", "an int >= 1", "-2 (int)"),
    ("gradient_accumulation_steps=0", "an int >= 1", "0 (int)"),
    ("keep_last=0", "an int >= 1", "0 (int)"),
    ("dtype=fp16", "one of ['fp32', 'bf16']", "'fp16' (str)"),
    ("float8.recipe=tensorwize", "one of ['tensorwise', 'rowwise', 'rowwise_with_gw_hp'] or null",
     "'tensorwize' (str)"),
    ("data.num_activities=500", "an int in [1, 320] or null", "500 (int)"),
    ("resume=maybe", "a bool (true / false)", "'maybe' (str)"),
    ("optimizer=null", "a mapping with a _component_ key (the other keys are its arguments)",
     "None (NoneType)"),
    ("data=5", "a mapping", "5 (int)"),
    ("float8=true", "a mapping or null", "True (bool)"),
])
def test_bad_value_names_key_value_range_and_override_before_writing(override, expected, got, tmp_path,
                                                                     small_run):
    key = override.split("=")[0]
    message = f"config key '{key}' " + OVERRIDE.format(override, expected, got)
    with pytest.raises(ConfigError) as e:
        run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, override])
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_bad_value_in_a_file_names_the_file(tmp_path):
    text = open(load_config("tiny_pretrain")._config_path_).read()
    p = tmp_path / "mine.yaml"
    p.write_text(text.replace("batch_size: 16", "batch_size: 0"))
    with pytest.raises(ConfigError, match=rf"config key 'batch_size' in {p}: expected an int >= 1, got 0"):
        FinetuneRecipe(load_config(p))


def test_required_key_and_missing_path_are_named(tmp_path, small_run):
    with pytest.raises(ConfigError,
                       match=r"config key 'max_steps' is required: set it in .*tiny_pretrain\.yaml"):
        FinetuneRecipe(load_config("tiny_pretrain", ["~max_steps"]))
    with pytest.raises(ConfigError, match=r"config key 'qat.scheme' is required"):
        QATRecipe(load_config("tiny_qat", ["~qat.scheme"]))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError, match=rf"config key 'data.source' in the command-line override "
                                          rf"'data.source={missing}': path '{missing}' does not exist"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=1", f"data.source={missing}"])
    assert not (tmp_path / "run").exists()


def test_valid_config_is_typed_with_defaults():
    cfg = FinetuneRecipe(load_config("tiny_pretrain", ["clip_grad_norm=1", "~keep_last"])).cfg
    assert cfg.clip_grad_norm == 1.0 and isinstance(cfg.clip_grad_norm, float)
    assert cfg.keep_last == 2 and cfg.overwrite is False
