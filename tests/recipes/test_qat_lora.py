"""qat_recipe with ``qat.lora``: only the adapters (and learned scales) train, the fake quant sees the merged
weight, and the checkpoint is a plain float model holding that merged weight, deployed bit-exactly."""

import pytest
import torch

from lowbit import qat
from lowbit.models.checkpoint import list_checkpoints, load_checkpoint
from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.qat_recipe import QATRecipe
from lowbit.recipes.training import run
from tests.conftest import SMALL_RUN, assert_deploys_exactly


def _cfg(tmp_path, *extra):
    return load_config("tiny_qat", [*SMALL_RUN, f"output_dir={tmp_path / 'run'}", "tokenizer.vocab_size=300",
                                    "max_steps=3", "checkpoint_every=0", "optimizer.lr=1e-2",
                                    "qat.scheme=8da4w", "qat.group_size=16", *extra])


def test_lora_qat_trains_adapters_only_and_its_checkpoint_deploys_exactly(tmp_path):
    recipe = run(QATRecipe, _cfg(tmp_path, "qat.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj, w2]}",
                                 "qat.distill={}", "qat.learn_ranges=true", "qat.ranges_lr=1e-3"))
    model = recipe.model.eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in recipe.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trained}
    assert trained and all(n.endswith(("lora_a.weight", "lora_b.weight", "weight_scale")) for n in trained)
    adapted = {n.removesuffix(".lora_a.weight") for n in trained if n.endswith("lora_a.weight")}
    assert {n.rpartition(".")[2] for n in adapted} == {"q_proj", "v_proj", "w2"}
    teacher = recipe.teacher.state_dict()
    for name in adapted:  # base weights frozen; the adapters moved off lora_b = 0
        assert torch.equal(model.get_submodule(name).weight, teacher[f"{name}.weight"]), name
        assert model.get_submodule(name).lora_b.weight.abs().sum() > 0, name

    ckpt = list_checkpoints(tmp_path / "run")[-1]
    plain, _, meta = load_checkpoint(ckpt)
    assert not any("lora" in k for k in plain.state_dict())
    for name in adapted:  # the checkpoint holds W + (alpha / rank) B A, as the fake quant computed it
        m = model.get_submodule(name)
        want = m.weight + 2.0 * (m.lora_b.weight @ m.lora_a.weight)
        torch.testing.assert_close(plain.get_submodule(name).weight, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(plain.get_submodule(name).weight, qat.modules.merged_lora_weight(m))
    assert_deploys_exactly(model, plain, meta, "8da4w")


def test_lora_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"qat.lora.targets.*no linear layer is called \['wq'\].*'q_proj'"):
        run(QATRecipe, _cfg(tmp_path, "qat.lora={targets: [q_proj, wq]}"))
    with pytest.raises(ConfigError, match="qat.train_weights.*LoRA adapters"):
        run(QATRecipe, _cfg(tmp_path, "qat.lora={}", "qat.train_weights=false", "qat.learn_ranges=true",
                            "overwrite=true"))
    with pytest.raises(ConfigError, match="qat.lora.rank"):
        run(QATRecipe, _cfg(tmp_path, "qat.lora={rank: 0}", "overwrite=true"))
