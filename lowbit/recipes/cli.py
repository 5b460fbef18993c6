"""The ``lowbit`` command.

    lowbit run RECIPE [torchrun options] --config NAME|PATH [key=value ...]
    lowbit eval --checkpoint DIR [--tasks hellaswag_local|hellaswag] [--task-file F] [--scheme S] [--compile]
    lowbit bench --checkpoint DIR | --preset NAME --schemes none,8w,4w,8da4w ...
    lowbit demo [--output DIR]
    lowbit data --output DIR            (write the generated corpus and hellaswag-format task)
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from lowbit.recipes.errors import UsageError

RECIPE_DIR = Path(__file__).parent


def known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*_recipe.py"))


def _check_recipe(name: str) -> str:
    if name not in known_recipes():
        raise UsageError(f"unknown recipe {name!r}; known recipes: {known_recipes()}")
    return name


def run_recipe(recipe: str, config: str | Path, overrides: list[str] = ()):
    """Run a recipe in this process (single device); returns the finished recipe object."""
    from lowbit.recipes.config import load_config
    from lowbit.recipes.training import run

    module = importlib.import_module(f"lowbit.recipes.{_check_recipe(recipe)}")
    return run(module.RECIPE, load_config(config, list(overrides)))


def _run(argv: list[str]) -> int:
    """``lowbit run``: resolve recipe and config names, then hand over to torchtune's ``tune run``
    (which launches torchrun when distributed options such as ``--nproc_per_node`` are given)."""
    from torchtune._cli.tune import TuneCLIParser

    from lowbit.recipes.config import resolve_config_path

    recipe_idx = next((i for i, a in enumerate(argv) if a in known_recipes() or a.endswith("_recipe")), None)
    if recipe_idx is None or "--config" not in argv:
        raise UsageError("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]; "
                         f"recipes: {known_recipes()}")
    recipe = _check_recipe(argv[recipe_idx])
    cfg_idx = argv.index("--config")
    if cfg_idx < recipe_idx or cfg_idx + 1 >= len(argv):
        raise UsageError("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]")
    # torchrun options may come before or after the recipe name; tune run wants them before it.
    launcher = argv[:recipe_idx] + argv[recipe_idx + 1:cfg_idx]
    config = str(resolve_config_path(argv[cfg_idx + 1]).resolve())
    # A relative path: tune run turns it into the module path lowbit.recipes.<recipe>.
    args = [*launcher, f"lowbit/recipes/{recipe}.py", "--config", config, *argv[cfg_idx + 2:]]
    sys.argv = ["tune", "run", *args]
    parser = TuneCLIParser()
    parser.run(parser.parse_args())
    return 0


def _data(argv: list[str]) -> int:
    import argparse

    from lowbit.data import generate_corpus, generate_hellaswag, make_world, write_jsonl

    p = argparse.ArgumentParser(prog="lowbit data", description="Write lowbit's generated corpus and task.")
    p.add_argument("--output", default="lowbit_data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-docs", type=int, default=4096)
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--num-activities", type=int, default=64, help="activities in the world (at most 320)")
    a = p.parse_args(argv)
    out = Path(a.output)
    world = make_world(a.seed, a.num_activities)
    write_jsonl([{"text": t} for t in generate_corpus(a.num_docs, a.seed, world)], out / "corpus.jsonl")
    write_jsonl(generate_hellaswag(a.num_items, a.seed, world), out / "hellaswag_local.jsonl")
    print(f"wrote {out / 'corpus.jsonl'} and {out / 'hellaswag_local.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "run": _run,
        "eval": lambda a: importlib.import_module("lowbit.eval.cli").main(a),
        "bench": lambda a: importlib.import_module("lowbit.eval.bench").main(a),
        "demo": lambda a: importlib.import_module("lowbit.recipes.demo").main(a),
        "data": _data,
    }
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return commands[argv[0]](argv[1:]) or 0
    except (Exception, KeyboardInterrupt) as e:
        from lowbit.recipes.errors import exit_status

        return exit_status(f"lowbit {argv[0]}", e)


if __name__ == "__main__":
    sys.exit(main())
