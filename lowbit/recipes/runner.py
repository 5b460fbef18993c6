"""Run a recipe by name in this process (one device): the library side of ``lowbit run``.

    from lowbit.recipes.runner import run_recipe
    r = run_recipe("qat_recipe", "tiny_qat", ["max_steps=10", "output_dir=runs/q"])
    r.losses, r.output_dir, r.model, r.optimizer

The recipe classes are listed here statically; the recipe modules never import this one.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.recipes import finetune_recipe, qat_recipe
from lowbit.recipes.config import load_config
from lowbit.recipes.errors import UsageError
from lowbit.recipes.training import TrainingRecipe, run

RECIPES: dict[str, type[TrainingRecipe]] = {
    "finetune_recipe": finetune_recipe.RECIPE,
    "qat_recipe": qat_recipe.RECIPE,
}


def known_recipes() -> list[str]:
    """Names accepted by :func:`run_recipe` and ``lowbit run``."""
    return sorted(RECIPES)


def check_recipe(name: str) -> type[TrainingRecipe]:
    """The recipe class called ``name``; ``UsageError`` naming the known recipes otherwise."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; known recipes: {known_recipes()}")
    return RECIPES[name]


def run_recipe(recipe: str, config: str | Path, overrides: list[str] = ()) -> TrainingRecipe:
    """Run ``recipe`` with a bundled config name or YAML path plus ``key=value`` overrides.

    Returns the finished recipe object (``.losses``, ``.output_dir``, ``.model``, ``.optimizer``).
    """
    return run(check_recipe(recipe), load_config(config, list(overrides)))
