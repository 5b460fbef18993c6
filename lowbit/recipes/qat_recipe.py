"""Quantization-aware fine-tuning: the shared training loop on a ``lowbit.qat.prepare``-d model.

    tune run lowbit/recipes/qat_recipe.py --config lowbit/recipes/configs/tiny_qat.yaml
    lowbit run qat_recipe --config tiny_qat qat.scheme=4w qat.group_size=64

Config keys (besides the shared ones): ``qat.scheme`` (``8da4w | 4w | 8w | 8da8w | 8da3w | 8da2w | 3w |
2w``), ``qat.group_size``
(null: the scheme's default), ``qat.fake_quant_after_n_steps`` (train in float for the first N steps,
then fake-quantize), ``qat.embeddings`` (also fake-quantize untied embeddings),
``qat.freeze_embeddings`` (no updates to the token embeddings, nor to an output head tied to them),
``qat.distill`` (train against a frozen teacher's next-token distribution: loss =
``kl_weight * T^2 KL(teacher || student) + ce_weight * CE``, the teacher being the model as loaded or
``qat.distill.teacher``), ``qat.learn_ranges`` (trainable per-group weight scales, LSQ, at
``qat.ranges_lr``, starting at ``qat.ranges_init``: ``minmax``, ``mse`` or ``gptq`` on
``qat.calibration_rows`` training rows), ``qat.train_weights``
(false: ranges only) and the shared ``compile``. The
checkpoint is a plain float state dict (plus ``qparams.safetensors`` with learned ranges);
``lowbit.json`` records ``qat_scheme`` / ``qat_group_size`` (and ``qat_embeddings``) so that
``lowbit eval`` converts it with the same config.
"""

import copy
import logging
import sys

import torch
import torch.nn.functional as F

from lowbit import qat
from lowbit.models.checkpoint import load_checkpoint
from lowbit.models.presets import ModelArgs
from lowbit.models.tokenizer import vocab_size_of
from lowbit.qat.gptq import gptq_init
from lowbit.qat.lora import ADAPTER_SUFFIXES, add_lora, merge_lora_state_dict
from lowbit.qat.modules import QPARAM_NAMES
from lowbit.quant.dtypes import DTYPE_NAMES
from lowbit.recipes.config import ConfigError, origin, parse
from lowbit.recipes.distributed import shard_model
from lowbit.recipes.schema import QATConfig
from lowbit.recipes.training import TrainingRecipe, run

log = logging.getLogger("lowbit")

# Text on which a teacher's tokenizer must split exactly as the student's (words, code, digits, accents).
_TOKENIZER_PROBE = "The quick brown fox: def f(x): return x**2 + 1  # 1234.5 naïve café 東京 \n\t<|end|>"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, kl_weight: float = 1.0,
                      ce_weight: float = 0.0) -> torch.Tensor:
    """``kl_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(student, targets)``, mean per token.

    Args:
        student_logits / teacher_logits: ``[..., vocab]`` (any float dtype; computed in fp32).
        targets: ``[...]`` int64 next-token ids (used only when ``ce_weight > 0``).
        temperature: softmax temperature ``T`` of both distributions; ``T^2`` keeps gradient scale.

    Returns:
        A scalar fp32 tensor.
    """
    s = student_logits.float().flatten(0, -2)
    loss = s.new_zeros(())
    if kl_weight:
        log_p_t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        loss = loss + kl_weight * temperature**2 * kl
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s, targets.flatten())
    return loss


class QATRecipe(TrainingRecipe):
    """``TrainingRecipe`` whose model is prepared for QAT with ``cfg.qat``."""

    recipe_name = "qat_recipe"
    CONFIG_SCHEMA = QATConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        q = self.cfg.qat
        try:
            self.scheme = qat.get_scheme(q.scheme, q.group_size)
        except ValueError as e:
            raise ConfigError(f"config key 'qat' in {origin(self.cfg, 'qat.scheme')}: {e}") from e
        self.fake_quant_after = q.fake_quant_after_n_steps
        self.embeddings = q.embeddings
        self.distill = q.distill
        self.teacher: torch.nn.Module | None = None
        self._fq_on: bool | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.distill is not None:
            self.teacher = self._build_teacher(model)
        q = self.cfg.qat
        if q.lora is not None:
            self._add_lora(model)
        try:
            qat.prepare(model, self.scheme, embeddings=self.embeddings, learn_ranges=q.learn_ranges,
                        ranges_init="mse" if q.ranges_init == "gptq" else q.ranges_init)
        except ValueError as e:
            raise ConfigError(f"config key 'qat.learn_ranges' in {origin(self.cfg, 'qat.learn_ranges')}: "
                              f"{e}") from None
        left = [(n, m) for n, m in model.named_modules()
                if type(m) is torch.nn.Linear and not n.endswith((".lora_a", ".lora_b"))]
        if left:
            name, m = left[0]
            raise ConfigError(
                f"config key 'qat.group_size' in {origin(self.cfg, 'qat.group_size')}: scheme {self.scheme} "
                f"cannot quantize {len(left)} linear layer(s), e.g. {name!r} (in_features {m.in_features}, "
                f"out_features {m.out_features}); choose a group size that divides every layer's "
                "in_features, or another scheme")
        if q.ranges_init != "minmax" and not q.learn_ranges:
            raise ConfigError(f"config key 'qat.ranges_init' in {origin(self.cfg, 'qat.ranges_init')}: "
                              f"{q.ranges_init!r} initialises learned ranges; set qat.learn_ranges=true")
        if q.ranges_init == "gptq":
            if q.lora is not None:
                raise ConfigError(f"config key 'qat.ranges_init' in {origin(self.cfg, 'qat.ranges_init')}: "
                                  "'gptq' rewrites the base weights, which qat.lora freezes; use 'mse'")
            if self.cfg.resume and self.run.resume_from is not None:
                log.info("qat_recipe: resuming, so GPTQ's start is skipped (the checkpoint holds the weights "
                         "and ranges)")
            else:
                gptq_init(model, self.rows[:q.calibration_rows, :-1].to(self.rt.device),
                          batch_size=self.cfg.batch_size)
        if q.freeze_embeddings:
            for mod in model.modules():
                if isinstance(mod, torch.nn.Embedding):
                    mod.weight.requires_grad_(False)  # a tied output head shares this Parameter
        if not q.train_weights:
            if not q.learn_ranges:
                raise ConfigError(f"config key 'qat.train_weights' in {origin(self.cfg, 'qat.train_weights')}"
                                  ": false trains only the learned ranges, so it needs qat.learn_ranges=true")
            for name, p in model.named_parameters():
                if name.rpartition(".")[2] not in QPARAM_NAMES:
                    p.requires_grad_(False)
        if q.lora is not None:  # the adapters (and learned ranges) train; every other weight is frozen
            for name, p in model.named_parameters():
                if not name.endswith(ADAPTER_SUFFIXES) and name.rpartition(".")[2] not in QPARAM_NAMES:
                    p.requires_grad_(False)
        n = len(qat.fake_quant_modules(model))
        log.info("qat_recipe: %d layers fake-quantized with %s%s", n, self.scheme,
                 f" from step {self.fake_quant_after + 1}" if self.fake_quant_after else "")
        self._set_fake_quant(model, self.fake_quant_after == 0)
        return model

    def _add_lora(self, model: torch.nn.Module) -> None:
        q = self.cfg.qat
        if not q.train_weights:
            raise ConfigError(f"config key 'qat.train_weights' in {origin(self.cfg, 'qat.train_weights')}: "
                              "false freezes the LoRA adapters of qat.lora too; set one of them")
        try:
            names = add_lora(model, list(q.lora.targets), q.lora.rank, q.lora.alpha)
        except ValueError as e:
            raise ConfigError(f"config key 'qat.lora.targets' in {origin(self.cfg, 'qat.lora.targets')}: "
                              f"{e}") from None
        log.info("qat_recipe: LoRA rank %d, alpha %g on %d layers (%s)", q.lora.rank, q.lora.alpha,
                 len(names), ", ".join(q.lora.targets))

    def float_weights(self, state_dict: dict) -> dict:
        """With LoRA, the checkpoint's float model holds the merged weights the fake quant saw."""
        lora = self.cfg.qat.lora
        return state_dict if lora is None else merge_lora_state_dict(state_dict, lora.rank, lora.alpha)

    def _build_teacher(self, student: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher: the model as loaded (before prepare), or ``qat.distill.teacher``."""
        d = self.distill
        if d.teacher is None:
            teacher = copy.deepcopy(student)
        else:
            teacher, tokenizer, meta = load_checkpoint(d.teacher)
            self._check_teacher_vocab(ModelArgs.from_dict(meta["model_args"]).vocab_size, tokenizer)
        dtype = DTYPE_NAMES[d.teacher_dtype] if d.teacher_dtype else self.dtype
        teacher = teacher.to(device=self.rt.device, dtype=dtype).eval().requires_grad_(False)
        if self.rt.distributed:
            teacher = shard_model(teacher, self.rt)
        log.info("qat_recipe: distilling from %s (%s), T=%g, kl_weight=%g, ce_weight=%g",
                 d.teacher or "the model as loaded", str(dtype).removeprefix("torch."), d.temperature,
                 d.kl_weight, d.ce_weight)
        return teacher

    def _check_teacher_vocab(self, t_vocab: int, tokenizer) -> None:
        where = f"config key 'qat.distill.teacher' in {origin(self.cfg, 'qat.distill.teacher')}"
        s_vocab = self.model_args.vocab_size
        if t_vocab != s_vocab:
            raise ConfigError(f"{where}: teacher {self.distill.teacher!r} has a vocabulary of {t_vocab} "
                              f"tokens, the student {s_vocab}; distillation needs the same vocabulary")
        if vocab_size_of(tokenizer) != vocab_size_of(self.tokenizer) or (
                tokenizer.encode(_TOKENIZER_PROBE, add_bos=False, add_eos=False)
                != self.tokenizer.encode(_TOKENIZER_PROBE, add_bos=False, add_eos=False)):
            raise ConfigError(f"{where}: teacher {self.distill.teacher!r} tokenizes text differently from "
                              "the student's tokenizer; distillation compares distributions over the same "
                              "token ids, so both must use the same tokenizer")

    def loss_on(self, rows: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return super().loss_on(rows)
        logits = self.model(rows[:, :-1])
        with torch.no_grad():
            teacher_logits = self.teacher(rows[:, :-1])
        d = self.distill
        return distillation_loss(logits, teacher_logits, rows[:, 1:], d.temperature, d.kl_weight,
                                 d.ce_weight)

    def param_groups(self, model: torch.nn.Module) -> list:
        """Two groups when ranges are learned: the weights, and the qparams at ``qat.ranges_lr``."""
        ranges = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.rpartition(".")[2] in QPARAM_NAMES]
        if not ranges:
            return super().param_groups(model)
        rest = [p for n, p in model.named_parameters()
                if p.requires_grad and n.rpartition(".")[2] not in QPARAM_NAMES]
        lr = self.cfg.qat.ranges_lr
        group = {"params": ranges, **({"lr": lr} if lr is not None else {})}
        return ([{"params": rest}] if rest else []) + [group]

    def after_optimizer_step(self) -> None:
        if self.cfg.qat.learn_ranges:
            qat.clamp_learned_ranges_(self.model)

    def _set_fake_quant(self, model, on: bool) -> None:
        if on != self._fq_on:
            qat.enable_fake_quant(model, on)
            self._fq_on = on

    def on_step_start(self, step: int) -> None:
        self._set_fake_quant(self.model, step > self.fake_quant_after)

    def checkpoint_metadata(self) -> dict:
        return {"qat_scheme": self.scheme.name, "qat_group_size": self.scheme.group_size,
                "qat_embeddings": self.embeddings, "qat_learn_ranges": self.cfg.qat.learn_ranges}


RECIPE = QATRecipe


@parse
def recipe_main(cfg) -> None:
    """Quantization-aware fine-tuning with a lowbit QAT config."""
    run(QATRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
