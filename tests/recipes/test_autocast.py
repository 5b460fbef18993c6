"""``autocast: bf16``: the forward runs under torch.autocast (bf16 matmuls) while weights, gradients and
optimizer state stay fp32; with float8 it is a config error."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.qat_recipe import QATRecipe
from lowbit.recipes.training import run
from tests.conftest import SMALL_RUN


def _cfg(tmp_path, *extra):
    return load_config("tiny_qat", [*SMALL_RUN, f"output_dir={tmp_path / 'run'}", "tokenizer.vocab_size=300",
                                    "max_steps=2", "checkpoint_every=0", *extra])


def test_autocast_runs_the_forward_in_bf16_on_fp32_weights(tmp_path):
    first = {}

    class Spy(QATRecipe):
        def loss_on(self, rows):
            loss = super().loss_on(rows)
            if not first:  # before any update: the same forward in bf16 autocast, and in fp32, by hand
                with torch.no_grad():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        bf = self.model(rows[:, :-1])
                    with torch.autocast("cpu", enabled=False):
                        fp = self.model(rows[:, :-1])
                y = rows[:, 1:].flatten()
                first.update(loss=loss.item(),
                             bf16=F.cross_entropy(bf.float().flatten(0, 1), y).item(),
                             fp32=F.cross_entropy(fp.float().flatten(0, 1), y).item())
            return loss

    recipe = run(Spy, _cfg(tmp_path, "autocast=bf16", "model.overrides.embed_dim=256",
                           "model.overrides.intermediate_dim=512"))
    assert first["loss"] == first["bf16"]
    assert first["loss"] != first["fp32"]  # bf16 matmuls round differently from fp32 ones
    assert first["loss"] == pytest.approx(first["fp32"], rel=2e-2)
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters())
    for state in recipe.optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")


def test_autocast_with_float8_or_another_dtype_is_a_config_error(tmp_path):
    cfg = load_config("tiny_pretrain", [*SMALL_RUN, f"output_dir={tmp_path / 'run'}", "max_steps=1",
                                        "autocast=bf16", "float8={recipe: tensorwise, emulate: true}"])
    from lowbit.recipes.finetune_recipe import FinetuneRecipe

    with pytest.raises(ConfigError, match="'autocast' and 'float8'"):
        run(FinetuneRecipe, cfg)
    cfg = load_config("tiny_pretrain", [*SMALL_RUN, f"output_dir={tmp_path / 'x'}", "max_steps=1",
                                        "autocast=fp16"])
    with pytest.raises(ConfigError, match="autocast"):
        run(FinetuneRecipe, cfg)
