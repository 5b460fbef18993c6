"""Quantization-aware fine-tuning: the shared training loop on a ``lowbit.qat.prepare``-d model.

    tune run lowbit/recipes/qat_recipe.py --config lowbit/recipes/configs/tiny_qat.yaml
    lowbit run qat_recipe --config tiny_qat qat.scheme=4w qat.group_size=64

Config keys (besides the shared ones): ``qat.scheme`` (``8da4w | 4w | 8w | 8da8w``), ``qat.group_size``
(null: the scheme's default), ``qat.fake_quant_after_n_steps`` (train in float for the first N steps,
then fake-quantize), ``qat.embeddings`` (also fake-quantize untied embeddings), and the shared
``compile``. The checkpoint is a plain float state dict; ``lowbit.json`` records ``qat_scheme`` /
``qat_group_size`` (and ``qat_embeddings``) so that ``lowbit eval`` converts it with the same config.
"""

import logging
import sys

import torch

from lowbit import qat
from lowbit.recipes.config import ConfigError, origin, parse
from lowbit.recipes.schema import QATConfig
from lowbit.recipes.training import TrainingRecipe, run

log = logging.getLogger("lowbit")


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
        self._fq_on: bool | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        qat.prepare(model, self.scheme, embeddings=self.embeddings)
        n = len(qat.fake_quant_modules(model))
        log.info("qat_recipe: %d layers fake-quantized with %s%s", n, self.scheme,
                 f" from step {self.fake_quant_after + 1}" if self.fake_quant_after else "")
        self._set_fake_quant(model, self.fake_quant_after == 0)
        return model

    def _set_fake_quant(self, model, on: bool) -> None:
        if on != self._fq_on:
            qat.enable_fake_quant(model, on)
            self._fq_on = on

    def on_step_start(self, step: int) -> None:
        self._set_fake_quant(self.model, step > self.fake_quant_after)

    def checkpoint_metadata(self) -> dict:
        return {"qat_scheme": self.scheme.name, "qat_group_size": self.scheme.group_size,
                "qat_embeddings": self.embeddings}


RECIPE = QATRecipe


@parse
def recipe_main(cfg) -> None:
    """Quantization-aware fine-tuning with a lowbit QAT config."""
    run(QATRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
