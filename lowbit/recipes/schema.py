"""The typed config schema of the training recipes: every key's type, default and allowed range.

A schema is a dataclass (OmegaConf structured config). ``metadata`` on a field adds what a type
cannot say: ``min`` / ``max`` (inclusive), ``choices``, ``component`` (a ``_component_`` node whose
other keys are its kwargs) and ``path`` (a path that must exist when set, unless it is ``generated`` /
a model name where ``path`` says so; checked by :func:`check_paths` at the start of ``setup``, so that
a config can be inspected on another machine).

:func:`validate_config` checks a loaded config against a schema before anything is built or written;
every error names the key, the bad value, what was expected, and the file or override it came from.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowbit.data.real_text import SOURCES as TEXT_SOURCES
from lowbit.float8.config import FLOAT8_DTYPES
from lowbit.float8.config import RECIPES as FLOAT8_RECIPES
from lowbit.models.checkpoint import MODEL_NAMES
from lowbit.models.presets import PRESETS
from lowbit.qat.lora import LORA_TARGETS
from lowbit.qat.modules import RANGE_INITS
from lowbit.recipes.config import HIDDEN_KEYS, ConfigError, origin


def _f(default=MISSING, *, factory=None, **meta):
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    preset: str = _f("tiny", choices=tuple(PRESETS))
    overrides: dict[str, Any] | None = None  # ModelArgs fields, checked by ModelArgs.from_dict


@dataclass
class TokenizerSection:
    path: str | None = _f(None, path=True)  # null: train a byte-level BPE into output_dir/tokenizer
    vocab_size: int | None = _f(1024, min=259)  # >= 256 bytes + BOS / EOS / PAD; null: no BPE training


@dataclass
class DataSection:
    source: str = _f("generated", path="unless generated")
    num_docs: int = _f(4096, min=1)
    world_seed: int = _f(0, min=0)
    num_activities: int | None = _f(64, min=1, max=320)
    seq_len: int = _f(128, min=1)
    text_field: str = "text"


@dataclass
class Float8Section:
    recipe: str | None = _f(None, choices=FLOAT8_RECIPES)
    emulate: bool = False
    grad_output_dtype: str | None = _f(None, choices=tuple(FLOAT8_DTYPES))
    enable_fsdp_float8_all_gather: bool = False
    precompute_float8_scales_for_fsdp: bool = False


@dataclass
class TrainingConfig:
    """The keys every training recipe takes (see ``configs/tiny_pretrain.yaml`` for their meaning)."""

    output_dir: str = MISSING
    seed: int = _f(0, min=0)
    model: ModelSection = _f(factory=ModelSection)
    base_checkpoint: str | None = _f(None, path="or model name")  # lowbit / HF dir, GGUF file, MODEL_NAMES
    tokenizer: TokenizerSection = _f(factory=TokenizerSection)
    data: DataSection = _f(factory=DataSection)
    batch_size: int = _f(min=1)
    gradient_accumulation_steps: int = _f(1, min=1)
    max_steps: int = _f(min=1)
    optimizer: dict[str, Any] = _f(component=True)
    lr_scheduler: dict[str, Any] | None = _f(None, component=True)
    clip_grad_norm: float | None = _f(None, min=0.0)
    dtype: str = _f("fp32", choices=("fp32", "bf16"))
    autocast: str | None = _f(None, choices=("bf16",))  # matmuls in bf16 on fp32 weights (torch.autocast)
    device: str | None = _f(None, choices=("cpu", "cuda", "auto"))  # null: auto
    compile: bool = False
    float8: Float8Section | None = None
    checkpoint_every: int | None = _f(0, min=0)  # 0 / null: only at the end
    keep_last: int = _f(2, min=1)
    resume: bool = False
    overwrite: bool = False  # delete the run already in output_dir and start a new one
    log_every: int = _f(1, min=1)
    progress_bar: bool = True
    _config_path_: str | None = None  # where the config came from (set by load_config)
    _overrides_: list[str] | None = None


@dataclass
class DistillSection:
    """Distillation from a frozen teacher: loss = kl_weight * T^2 KL(teacher || student) + ce_weight * CE."""

    teacher: str | None = _f(None, path="or model name")  # null: the model as loaded, before prepare
    temperature: float = _f(1.0, min=0.01)
    kl_weight: float = _f(1.0, min=0.0)
    ce_weight: float = _f(0.0, min=0.0)
    teacher_dtype: str | None = _f(None, choices=("fp32", "bf16"))  # null: the training dtype


@dataclass
class LoRASection:
    """LoRA adapters on the named linears (torchtune names); only they (and learned ranges) train."""

    rank: int = _f(8, min=1)
    alpha: float = _f(16.0, min=0.0)
    targets: list[str] = _f(factory=lambda: list(LORA_TARGETS))


@dataclass
class QATSection:
    scheme: str = MISSING  # checked against lowbit.qat.SCHEMES by the recipe (with the group size)
    group_size: int | None = _f(None, min=1)
    fake_quant_after_n_steps: int = _f(0, min=0)
    embeddings: bool = False
    distill: DistillSection | None = None  # null: plain next-token cross-entropy
    freeze_embeddings: bool = False  # token embeddings (and a head tied to them) get no updates
    learn_ranges: bool = False  # trainable per-group weight scales (and 4w zeros), LSQ gradients
    ranges_lr: float | None = _f(None, min=0.0)  # learning rate of the learned qparams (null: optimizer lr)
    # learned ranges start at min / max, the MSE range, or GPTQ's weights and ranges (calibrated on
    # calibration_rows rows of the training data)
    ranges_init: str = _f("minmax", choices=(*RANGE_INITS, "gptq"))
    calibration_rows: int = _f(32, min=1)
    train_weights: bool = True  # false: only the learned qparams train (needs learn_ranges)
    lora: LoRASection | None = None  # null: full fine-tune; else adapters on frozen weights (merged on save)


@dataclass
class QATConfig(TrainingConfig):
    qat: QATSection = _f(factory=QATSection)


# ----------------------------------------------------------------------------- validation
def _fields(schema: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``name -> (field, resolved type)`` of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(schema)}


def _unoptional(tp) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _section(tp) -> type | None:
    """The dataclass of a (possibly optional) section type, else None."""
    base, _ = _unoptional(tp)
    return base if dataclasses.is_dataclass(base) else None


def _describe(meta, tp) -> str:
    """What a field accepts, in words: ``an int >= 1``, ``one of ['fp32', 'bf16']``, ..."""
    base, optional = _unoptional(tp)
    if "choices" in meta:
        what = f"one of {list(meta['choices'])}"
    elif meta.get("component"):
        what = "a mapping with a _component_ key (the other keys are its arguments)"
    else:
        names = {int: "an int", float: "a number", bool: "a bool (true / false)", str: "a string"}
        what = names.get(base, "a mapping")
        if "min" in meta and "max" in meta:
            what += f" in [{meta['min']}, {meta['max']}]"
        elif "min" in meta:
            what += f" >= {meta['min']}"
    return what + (" or null" if optional else "")


def _error(cfg: DictConfig, dotted: str, value, meta, tp) -> ConfigError:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return ConfigError(f"config key {dotted!r} in {origin(cfg, dotted)}: expected {_describe(meta, tp)}, "
                       f"got {value!r} ({type(value).__name__})")


def _lookup(schema: type, dotted: str):
    """``(field, type)`` of a dotted key in a schema; None for a key inside a free-form mapping."""
    cls, found = schema, None
    for part in dotted.split("."):
        if cls is None or part not in _fields(cls):
            return None
        found = _fields(cls)[part]
        cls = _section(found[1])
    return found


def _check_unknown(cfg: DictConfig, node: DictConfig, schema: type, prefix: str) -> None:
    fields = _fields(schema)
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key in HIDDEN_KEYS and not prefix:
            continue
        if key not in fields:
            known = sorted(k for k in fields if k not in HIDDEN_KEYS)
            raise ConfigError(f"unknown config key {dotted!r} in {origin(cfg, dotted)}; "
                              f"known keys{' under ' + prefix[:-1] if prefix else ''}: {known}")
        f, tp = fields[key]
        if _section(tp) is not None and isinstance(node[key], DictConfig):
            _check_unknown(cfg, node[key], _section(tp), dotted + ".")
        elif _section(tp) is not None and node[key] is not None:
            raise _error(cfg, dotted, node[key], f.metadata, tp)  # a scalar where a section belongs


def _check_ranges(cfg: DictConfig, typed: DictConfig, schema: type, prefix: str) -> None:
    for name, (f, tp) in _fields(schema).items():
        value, dotted, meta = typed[name], f"{prefix}{name}", f.metadata
        if value is None or name in HIDDEN_KEYS:
            continue
        if _section(tp) is not None:
            _check_ranges(cfg, value, _section(tp), dotted + ".")
        elif ("choices" in meta and value not in meta["choices"]
              or "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]
              or meta.get("component") and "_component_" not in value):
            raise _error(cfg, dotted, value, meta, tp)


def validate_config(cfg: DictConfig, schema: type) -> DictConfig:
    """``cfg`` checked against ``schema``: a typed config holding every key (defaults filled in).

    Raises :class:`ConfigError` for an unknown key, a value of the wrong type or out of range, or a
    required key (no default) that is not set; the message names the key, the value and its source.
    """
    _check_unknown(cfg, cfg, schema, "")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        found = _lookup(schema, key)
        if found is None:
            raise ConfigError(f"config key {key!r} in {origin(cfg, key)}: {str(e).splitlines()[0]}") from None
        raise _error(cfg, key, OmegaConf.select(cfg, key, default=None), found[0].metadata,
                     found[1]) from None
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} is required: set it in "
                          f"{cfg.get('_config_path_') or 'the config'} or with {missing[0]}=VALUE")
    _check_ranges(cfg, typed, schema, "")
    return typed


def normalized(config: dict, schema: type) -> dict:
    """A saved plain config with the schema's defaults filled in (as is, if it no longer fits the schema)."""
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), config), resolve=True)
    except OmegaConfBaseException:
        return config


def check_paths(cfg: DictConfig, schema: type) -> None:
    """Raise :class:`ConfigError` naming the key if a path-valued key names a path that does not exist."""

    def walk(typed: DictConfig, cls: type, prefix: str) -> None:
        for name, (f, tp) in _fields(cls).items():
            value, dotted, kind = typed[name], f"{prefix}{name}", f.metadata.get("path")
            if value is None:
                continue
            if _section(tp) is not None:
                walk(value, _section(tp), dotted + ".")
            elif kind and not Path(value).exists():
                if (kind == "unless generated" and value in ("generated", *TEXT_SOURCES)
                        or kind == "or model name" and value in MODEL_NAMES):
                    continue
                names = (f" and is not one of the model names {sorted(MODEL_NAMES)}"
                         if kind == "or model name" else "")
                raise ConfigError(f"config key {dotted!r} in {origin(cfg, dotted)}: "
                                  f"path {value!r} does not exist{names}")

    walk(cfg, schema, "")
