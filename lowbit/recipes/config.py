"""Recipe configs: OmegaConf YAML + ``key=value`` overrides, validated against the recipe's schema.

torchtune's own parser accepts any key silently; a typo (``max_step=10``) would then train with the
default. Here every key must be known to the recipe and of the right type and range
(``lowbit.recipes.schema``), and errors name the key and where it came from.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowbit.recipes.errors import ConfigError

# Keys load_config adds to record where a config came from (for error messages).
HIDDEN_KEYS = ("_config_path_", "_overrides_")
CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path from itself or from a bundled config name (``tiny_pretrain``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        return p
    bundled = CONFIG_DIR / f"{p.name}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"unknown config {str(name_or_path)!r}: not a .yaml file nor one of {known}")


def load_config(name_or_path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a YAML config and apply ``key=value`` overrides (dotted keys; ``~key`` removes a key).

    The source file is recorded under the hidden key ``_config_path_`` for error messages.
    """
    path = resolve_config_path(name_or_path)
    cfg = OmegaConf.load(path)
    for item in overrides:
        if item.startswith("~"):
            parent, _, leaf = item[1:].rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise ConfigError(f"cannot remove {item[1:]!r}: not in {path}")
            del node[leaf]
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    cfg._config_path_ = str(path)
    cfg._overrides_ = list(overrides)
    return cfg


def origin(cfg: DictConfig, dotted: str) -> str:
    """Where config key ``dotted`` came from: its (last) command-line override, else the config file."""
    for item in reversed(cfg.get("_overrides_") or []):
        key = item.split("=", 1)[0].lstrip("~")
        if dotted == key or dotted.startswith(key + "."):
            return f"the command-line override {item!r}"
    return str(cfg.get("_config_path_") or "<config>")


def instantiate(cfg: DictConfig, key: str, *args, **kwargs):
    """``torchtune.config.instantiate`` of ``cfg[key]``, with errors that name the key and file."""
    from torchtune import config as tt_config

    try:
        return tt_config.instantiate(cfg[key], *args, **kwargs)
    except Exception as e:
        raise ConfigError(f"cannot instantiate config key {key!r} from {origin(cfg, key)}: {e}") from e


def parse(recipe_main):
    """Decorator for a recipe's ``main(cfg)``: parses ``--config PATH [key=value ...]`` from argv."""

    @functools.wraps(recipe_main)
    def wrapper(argv: list[str] | None = None):
        import argparse

        parser = argparse.ArgumentParser(description=recipe_main.__doc__)
        parser.add_argument("--config", required=True, help="YAML path or bundled config name")
        args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        flags = [o for o in overrides if o.startswith("--")]
        if flags:
            parser.error(f"unknown flag(s) {flags}: use key=value overrides")
        try:
            return recipe_main(load_config(args.config, overrides))
        except (Exception, KeyboardInterrupt) as e:
            from lowbit.recipes.errors import exit_status

            sys.exit(exit_status("lowbit", e))  # one line and a status for the user's errors

    return wrapper
