import pytest

from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.finetune_recipe import FinetuneRecipe


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    text = (load_config("tiny_pretrain")._config_path_)
    p = tmp_path / "mine.yaml"
    p.write_text(open(text).read() + "max_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step' in .*mine\.yaml"):
        FinetuneRecipe(load_config(p))


def test_unknown_nested_key_in_override_names_the_override():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.seqlen' in the command-line override 'data.seqlen=4'"
    ):
        FinetuneRecipe(load_config("tiny_pretrain", ["data.seqlen=4"]))


def test_missing_config_and_bad_override():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(FileNotFoundError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny_pretrain", ["max_steps"])


def test_bad_component_kwarg_names_key(tmp_path, small_run):
    from lowbit.recipes.runner import run_recipe

    with pytest.raises(ConfigError, match="cannot instantiate config key 'optimizer'.*lrr"):
        run_recipe("finetune_recipe", "tiny_pretrain", [*small_run, "max_steps=1", "optimizer.lrr=1"])
