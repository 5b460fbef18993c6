"""qat_recipe with distillation, learned ranges and partial training: losses against an independent
computation, what trains and what does not, the checkpoint's qparams and their deployment, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from lowbit import qat
from lowbit.models.checkpoint import load_checkpoint
from lowbit.recipes.config import ConfigError, load_config
from lowbit.recipes.qat_recipe import QATRecipe, distillation_loss
from lowbit.recipes.training import run
from tests.conftest import SMALL_RUN, assert_deploys_exactly


def _cfg(tmp_path, *extra):
    return load_config("tiny_qat", [*SMALL_RUN, f"output_dir={tmp_path / 'run'}", "tokenizer.vocab_size=300",
                                    "max_steps=2", "checkpoint_every=0", *extra])


def test_distillation_loss_matches_float64_reference():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    for temp, kw, cw in ((1.0, 1.0, 0.0), (2.0, 0.7, 0.3), (0.5, 0.0, 1.0)):
        p = torch.softmax(t.double() / temp, -1)
        kl = (p * (p.log() - torch.log_softmax(s.double() / temp, -1))).sum(-1).mean()
        ce = F.cross_entropy(s.double().flatten(0, 1), y.flatten())
        want = kw * temp**2 * kl + cw * ce
        got = distillation_loss(s, t, y, temp, kw, cw)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (temp, got, want)


def test_distilled_run_trains_student_only_and_its_first_loss_is_the_kl_to_the_teacher(tmp_path):
    cfg = _cfg(tmp_path, "qat.distill={temperature: 2.0, ce_weight: 0.5}", "qat.freeze_embeddings=true")
    first = {}

    class Spy(QATRecipe):
        def loss_on(self, rows):
            loss = super().loss_on(rows)
            if not first:  # before any update: recompute the loss from both models independently
                with torch.no_grad():
                    s, t = self.model(rows[:, :-1]).double(), self.teacher(rows[:, :-1]).double()
                    p = torch.softmax(t / 2, -1)
                    kl = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean()
                    ce = F.cross_entropy(s.flatten(0, 1), rows[:, 1:].flatten())
                first.update(loss=loss.item(), want=(4 * kl + 0.5 * ce).item())
            return loss

    recipe = run(Spy, cfg)
    assert first["loss"] == pytest.approx(first["want"], rel=1e-5)
    teacher_params = list(recipe.teacher.parameters())
    assert teacher_params and not any(p.requires_grad or p.grad is not None for p in teacher_params)
    in_optimizer = {id(p) for g in recipe.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher_params}
    assert id(recipe.model.tok_embeddings.weight) not in in_optimizer  # frozen embeddings
    assert not qat.fake_quant_modules(recipe.teacher)  # the teacher stays float


def test_ranges_only_run_changes_only_the_scales_and_deploys_exactly(tmp_path):
    cfg = _cfg(tmp_path, "qat.learn_ranges=true", "qat.train_weights=false", "qat.ranges_lr=1e-3",
               "qat.distill={}", "qat.scheme=8da4w", "qat.group_size=16")
    recipe = run(QATRecipe, cfg)
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (ckpt / "qparams.safetensors").exists()
    model, tok, meta = load_checkpoint(ckpt)
    assert json.loads((ckpt / "lowbit.json").read_text())["qat_learn_ranges"] is True
    # weights frozen: the checkpoint's float weights are the initial ones (the teacher's)
    for name, p in recipe.teacher.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    # the scales moved away from their min / max initialisation
    fresh = qat.prepare(load_checkpoint(ckpt)[0], "8da4w", group_size=16, learn_ranges=True)
    init = qat.learned_qparams(fresh)
    learned = meta["qat_qparams"]
    assert set(learned) == set(init) and learned
    assert any(not torch.equal(learned[k], init[k]) for k in learned)
    # lowbit eval's deploy path with the recorded scheme (fp32) equals the prepared model's forward
    prepared = qat.prepare(load_checkpoint(ckpt)[0], "8da4w", group_size=16)
    qat.load_learned_qparams(prepared, learned)
    assert_deploys_exactly(prepared, model, meta, "8da4w")


def test_gptq_initialised_run_deploys_exactly(tmp_path):
    cfg = _cfg(tmp_path, "qat.learn_ranges=true", "qat.ranges_init=gptq", "qat.calibration_rows=4",
               "qat.distill={}", "qat.scheme=8da4w", "qat.group_size=16")
    recipe = run(QATRecipe, cfg)
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    model, _, meta = load_checkpoint(ckpt)
    # GPTQ moved the float weights away from the teacher's (the model as loaded)
    teacher = recipe.teacher.state_dict()
    assert not torch.equal(teacher["layers.0.mlp.w1.weight"], model.state_dict()["layers.0.mlp.w1.weight"])
    prepared = qat.prepare(load_checkpoint(ckpt)[0], "8da4w", group_size=16)
    qat.load_learned_qparams(prepared, meta["qat_qparams"])
    assert_deploys_exactly(prepared, model, meta, "8da4w")


def test_resumed_gptq_run_skips_gptq_and_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    import shutil

    import lowbit.recipes.qat_recipe as qat_recipe

    args = ("qat.learn_ranges=true", "qat.ranges_init=gptq", "qat.calibration_rows=4", "qat.distill={}",
            "qat.scheme=8da4w", "qat.group_size=16", "max_steps=4", "checkpoint_every=2", "keep_last=2")
    full = run(QATRecipe, _cfg(tmp_path, *args))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000004")
    calls = []
    monkeypatch.setattr(qat_recipe, "gptq_init", lambda *a, **k: calls.append(1))
    resumed = run(QATRecipe, _cfg(tmp_path, *args, "resume=true"))
    assert not calls  # the checkpoint's weights and ranges replace GPTQ's start anyway
    assert resumed.losses == full.losses


def test_distill_and_ranges_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"qat.learn_ranges.*'8w' has no weight groups"):
        run(QATRecipe, _cfg(tmp_path, "qat.scheme=8w", "qat.group_size=null", "qat.learn_ranges=true"))
    with pytest.raises(ConfigError, match="qat.train_weights.*needs qat.learn_ranges=true"):
        run(QATRecipe, _cfg(tmp_path, "qat.train_weights=false", "overwrite=true"))
    with pytest.raises(ConfigError, match=r"qat.group_size.*8da3w\(group_size=256\) cannot quantize .* "
                                          r"'layers.0.attn.q_proj' \(in_features 64"):
        run(QATRecipe, _cfg(tmp_path, "qat.scheme=8da3w", "qat.group_size=256", "overwrite=true"))
    with pytest.raises(ConfigError, match="qat.ranges_init"):
        QATRecipe(_cfg(tmp_path, "qat.ranges_init=minimum"))
    with pytest.raises(ConfigError, match=r"qat.ranges_init.*'gptq' initialises learned ranges; set "
                                          r"qat.learn_ranges=true"):
        run(QATRecipe, _cfg(tmp_path, "qat.ranges_init=gptq", "overwrite=true"))
    with pytest.raises(ConfigError, match="qat.ranges_init.*'gptq' rewrites the base weights"):
        run(QATRecipe, _cfg(tmp_path, "qat.ranges_init=gptq", "qat.learn_ranges=true", "qat.lora={rank: 2}",
                            "overwrite=true"))
    with pytest.raises(ConfigError, match="qat.distill.temperature"):
        QATRecipe(_cfg(tmp_path, "qat.distill={temperature: 0}"))


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    teacher = run(QATRecipe, _cfg(tmp_path / "t", "tokenizer.vocab_size=280",
                                  "model.overrides.vocab_size=280"))
    with pytest.raises(ConfigError, match=r"qat.distill.teacher.*vocabulary of 280 tokens, the student 300"):
        run(QATRecipe, _cfg(tmp_path / "s", f"qat.distill={{teacher: {teacher.output_dir}}}",
                            "model.overrides.vocab_size=300"))
    other = run(QATRecipe, _cfg(tmp_path / "o", "tokenizer.vocab_size=290", "model.overrides.vocab_size=300"))
    with pytest.raises(ConfigError, match="tokenizes text differently"):
        run(QATRecipe, _cfg(tmp_path / "s2", f"qat.distill={{teacher: {other.output_dir}}}",
                            "model.overrides.vocab_size=300"))
