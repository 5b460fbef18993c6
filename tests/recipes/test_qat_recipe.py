"""qat_recipe: configs, prepare coverage of real Llama shapes (meta device), a short run, metadata."""

import json

import pytest
import torch
from torch import nn

from lowbit import qat
from lowbit.models import build_model
from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.qat_recipe import QATRecipe

REAL = {"llama3_2_1b_qat": (16, False), "llama3_2_3b_qat": (28, False), "llama3_1_8b_qat": (32, True)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_prepare_covers_every_linear_on_meta(name, tmp_path):
    cfg = load_config(name, [f"output_dir={tmp_path}"])
    recipe = QATRecipe(cfg)  # validates every key against the recipe schema
    assert recipe.scheme.name == "8da4w" and recipe.scheme.group_size == 32
    with torch.device("meta"):
        model = build_model(cfg.model.preset)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    layers, untied_head = REAL[name]
    assert n_linear == 7 * layers + int(untied_head)  # q, k, v, o, w1, w2, w3 (+ output head)
    recipe.prepare_model(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert len(qat.fake_quant_modules(model)) == n_linear


def test_bad_qat_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown QAT scheme 'int2'"):
        QATRecipe(load_config("tiny_qat", [f"output_dir={tmp_path}", "qat.scheme=int2"]))
    with pytest.raises(ConfigError, match="positive power of two"):
        QATRecipe(load_config("tiny_qat", [f"output_dir={tmp_path}", "qat.group_size=24"]))
    with pytest.raises(ConfigError, match="qat.sceme"):
        QATRecipe(load_config("tiny_qat", [f"output_dir={tmp_path}", "qat.sceme=4w"]))


def test_tiny_qat_run_records_scheme_and_fake_quant_schedule(tmp_path):
    from lowbit.recipes.training import run

    cfg = load_config("tiny_qat", [
        f"output_dir={tmp_path}", "max_steps=3", "progress_bar=false", "data.num_docs=128",
        "data.seq_len=32", "batch_size=2", "tokenizer.vocab_size=300", "qat.scheme=4w", "qat.group_size=32",
        "qat.fake_quant_after_n_steps=2", "model.overrides={num_layers: 1}",
    ])
    seen = []

    class Spy(QATRecipe):
        def on_step_start(self, step):
            super().on_step_start(step)
            seen.append(all(m.fake_quant_enabled for m in qat.fake_quant_modules(self.model).values()))

    recipe = run(Spy, cfg)
    assert seen == [False, False, True]
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    meta = json.loads((ckpt / "lowbit.json").read_text())
    assert meta["qat_scheme"] == "4w" and meta["qat_group_size"] == 32 and meta["recipe"] == "qat_recipe"
    # the checkpoint is a plain float state dict with the keys of the unprepared model
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    plain = build_model(recipe.model_args)
    plain.load_state_dict(sd, strict=True)
