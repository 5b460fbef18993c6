"""Full-weight training of a torchtune decoder: pretraining from a preset or fine-tuning a checkpoint.

tune run lowbit/recipes/finetune_recipe.py --config lowbit/recipes/configs/tiny_pretrain.yaml
lowbit run finetune_recipe --config tiny_pretrain max_steps=100 optimizer._component_=lowbit.optim.AdamW8bit
"""

import sys

from lowbit.recipes.config import parse
from lowbit.recipes.training import TrainingRecipe, run


class FinetuneRecipe(TrainingRecipe):
    """The shared training loop with no model transformation of its own (float8 is a converter from
    the ``float8`` config key, see ``lowbit.recipes.converters``)."""

    recipe_name = "finetune_recipe"


RECIPE = FinetuneRecipe


@parse
def recipe_main(cfg) -> None:
    """Train with a lowbit finetune config."""
    run(FinetuneRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
