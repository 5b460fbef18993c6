"""Recipe configs: OmegaConf YAML + ``key=value`` overrides, validated against the recipe's keys.

torchtune's own parser accepts any key silently; a typo (``max_step=10``) would then train with the
default. Here every key must be known to the recipe, and errors name the key and where it came from.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Schema leaves: a value, or COMPONENT (a `_component_` node whose other keys are its kwargs).
COMPONENT = "component"
CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config that names an unknown key, lacks a required one, or cannot be instantiated."""


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


def _origin(cfg: DictConfig, dotted: str) -> str:
    for item in cfg.get("_overrides_", []):
        if item.split("=", 1)[0] == dotted:
            return f"the command-line override {item!r}"
    return str(cfg.get("_config_path_", "<config>"))


def validate(cfg: DictConfig, schema: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first key of ``cfg`` not in ``schema`` and its source."""

    def walk(node: DictConfig, sch: dict, prefix: str) -> None:
        for key in node.keys():
            if prefix == "" and key in ("_config_path_", "_overrides_"):
                continue
            dotted = f"{prefix}{key}"
            if key not in sch:
                raise ConfigError(
                    f"unknown config key {dotted!r} in {_origin(cfg, dotted)}; "
                    f"known keys{' under ' + prefix[:-1] if prefix else ''}: {sorted(sch)}"
                )
            sub, value = sch[key], node[key]
            if sub == COMPONENT:
                if value is not None and (not isinstance(value, DictConfig) or "_component_" not in value):
                    raise ConfigError(f"config key {dotted!r} in {_origin(cfg, dotted)} needs a _component_")
            elif isinstance(sub, dict) and isinstance(value, DictConfig):
                walk(value, sub, dotted + ".")

    walk(cfg, schema, "")


def instantiate(cfg: DictConfig, key: str, *args, **kwargs):
    """``torchtune.config.instantiate`` of ``cfg[key]``, with errors that name the key and file."""
    from torchtune import config as tt_config

    try:
        return tt_config.instantiate(cfg[key], *args, **kwargs)
    except Exception as e:
        raise ConfigError(f"cannot instantiate config key {key!r} from {_origin(cfg, key)}: {e}") from e


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
        return recipe_main(load_config(args.config, overrides))

    return wrapper
