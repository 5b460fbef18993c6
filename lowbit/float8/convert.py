"""Swap ``nn.Linear`` layers for ``Float8Linear`` (and back), with the module filters.

``module_filter_fn(module, fqn) -> bool`` is asked about every ``nn.Linear`` (subclasses included) and
returns True to convert it. The default filter converts a plain ``nn.Linear`` (not a subclass such as
a QAT fake-quant layer) unless a dim is not a
multiple of 16 (``torch._scaled_mm`` needs that) or it is the output head (``output`` / ``lm_head``, whose
logits are the most precision-sensitive GEMM). ``auto_filter(recipe)`` additionally skips layers too small
to get faster in float8.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from lowbit.float8.config import Float8TrainingConfig
from lowbit.float8.fsdp import unwrap_weight, wrap_weight
from lowbit.float8.linear import Float8Linear, check_float8_hardware
from lowbit.quant.float8 import FLOAT8_DTYPES

log = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]
OUTPUT_HEAD_NAMES = ("output", "lm_head")


def default_skip_reason(module: nn.Module, fqn: str) -> str | None:
    """Why the default filter leaves ``module`` in high precision, or None if it converts it."""
    if type(module) is not nn.Linear:
        return f"{type(module).__name__}, not a plain nn.Linear"
    if fqn.split(".")[-1] in OUTPUT_HEAD_NAMES:
        return "output head"
    n, k = module.weight.shape
    if n % 16 or k % 16:
        return f"dims ({n}, {k}) not multiples of 16"
    return None


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Convert every ``nn.Linear`` whose dims are multiples of 16, except the output head."""
    return default_skip_reason(module, fqn) is None


# Smallest shapes that gain from float8, from torchao 0.14.1's published H100 microbenchmarks (the
# per-shape speedup tables in torchao/float8/README.md, "Performance", compiled linear fwd+bwd vs bf16,
# and the thresholds torchao derives from them in float8_linear_utils._auto_filter_for_*). lowbit has
# NOT re-measured them (no GPU was available when this was written); benchmarks/bench_float8_h100.py is
# the script to do so. N = out_features, K = in_features.
def _too_small_tensorwise(n: int, k: int) -> bool:
    return k <= 4096 and n <= 1024


def _too_small_rowwise(n: int, k: int) -> bool:
    return n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)


_TOO_SMALL = {
    "tensorwise": _too_small_tensorwise,
    "rowwise": _too_small_rowwise,
    "rowwise_with_gw_hp": _too_small_rowwise,  # not in torchao's tables; uses the rowwise thresholds
}


def auto_filter(recipe: str) -> ModuleFilter:
    """The default filter plus a size threshold per recipe (layers below it would run slower in float8).

    Thresholds come from torchao's published H100 tables, not from a lowbit measurement; see above.
    """
    if recipe not in _TOO_SMALL:
        raise ValueError(f"unknown float8 recipe {recipe!r}; expected one of {sorted(_TOO_SMALL)}")
    too_small = _TOO_SMALL[recipe]

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        return default_filter(module, fqn) and not too_small(*module.weight.shape)

    filter_fn.skip_reason = lambda m, fqn: (
        default_skip_reason(m, fqn)
        or (  # type: ignore[attr-defined]
            f"too small to gain on H100 ({tuple(m.weight.shape)}, auto filter)"
            if too_small(*m.weight.shape)
            else None
        )
    )
    return filter_fn


def _check_convertible(module: nn.Module, fqn: str) -> None:
    if isinstance(module, Float8Linear):
        raise RuntimeError(
            f"layer {fqn!r} is already a Float8Linear: the model was converted to float8 twice "
            "(call convert_back(model) first to change the recipe)"
        )
    if type(module) is not nn.Linear:
        raise TypeError(
            f"module_filter_fn selected layer {fqn!r} of type {type(module).__name__}, but only plain "
            "nn.Linear layers can be converted to float8 (its own forward would be lost); return False for it"
        )
    if module.weight.dtype in FLOAT8_DTYPES:
        raise TypeError(
            f"layer {fqn!r} has a {module.weight.dtype} weight; float8 training needs float32/bfloat16 "
            "master weights (it casts them to float8 itself)"
        )


def convert_to_float8_training(
    model: nn.Module,
    *,
    config: Float8TrainingConfig | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> nn.Module:
    """Swap the ``nn.Linear`` layers of ``model`` selected by ``module_filter_fn`` for ``Float8Linear``.

    In place (the same ``Parameter`` objects move to the new layers, so optimizers stay valid); returns
    ``model``, or the new layer when ``model`` itself is a selected ``nn.Linear``.

    Args:
        model: any module; its parameters stay in their dtype (float32 or bfloat16).
        config: the recipe; defaults to ``Float8TrainingConfig()`` (tensorwise, not emulated).
        module_filter_fn: ``(module, fqn) -> bool``, called for each ``nn.Linear`` (``fqn`` is its
            dotted name, ``""`` for the root); defaults to :func:`default_filter`. Use
            ``auto_filter(config.recipe)`` to also skip layers too small to gain on H100.

    Raises:
        ValueError: ``config`` is not a ``Float8TrainingConfig``.
        RuntimeError: the model already holds a ``Float8Linear`` (converted twice); a CUDA GPU older
            than SM89 without ``emulate``.
        TypeError: the filter selects an ``nn.Linear`` subclass (e.g. a QAT fake-quant layer), or a
            selected layer already has float8 weights.
    """
    if config is None:
        config = Float8TrainingConfig()
    if not isinstance(config, Float8TrainingConfig):
        raise ValueError(f"config must be a Float8TrainingConfig, got {type(config).__name__}")
    filter_fn = module_filter_fn if module_filter_fn is not None else default_filter
    skip_reason = getattr(
        filter_fn, "skip_reason", default_skip_reason if filter_fn is default_filter else None
    )

    for fqn, module in model.named_modules():
        if isinstance(module, Float8Linear):
            _check_convertible(module, fqn)

    converted: list[str] = []
    skipped: list[str] = []
    swaps: list[tuple[str, nn.Linear]] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not filter_fn(module, fqn):
            reason = skip_reason(module, fqn) if skip_reason else None
            skipped.append(f"{fqn or '<root>'} ({reason or 'module_filter_fn returned False'})")
            continue
        _check_convertible(module, fqn)
        check_float8_hardware(module.weight.device, config.emulate, fqn)
        swaps.append((fqn, module))

    for fqn, module in swaps:
        new = Float8Linear.from_linear(module, config, fqn)
        if fqn == "":
            model = new
        else:
            parent_name, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), name, new)
        if config.enable_fsdp_float8_all_gather:
            wrap_weight(new)
        converted.append(fqn or "<root>")

    log.info(
        "float8 (%s%s): converted %d linear layers: %s",
        config.recipe,
        ", emulated" if config.emulate else "",
        len(converted),
        ", ".join(converted) or "-",
    )
    log.info("float8: kept %d linear layers in high precision: %s", len(skipped), "; ".join(skipped) or "-")
    return model


def convert_back(model: nn.Module) -> nn.Module:
    """Replace every ``Float8Linear`` in ``model`` by a plain ``nn.Linear`` holding the same parameters.

    In place; returns ``model`` (or the new layer if ``model`` is itself a ``Float8Linear``). The state
    dict is unchanged, so the result saves and loads like a never-converted model.
    """
    if isinstance(model, Float8Linear):
        unwrap_weight(model)
        return model.to_linear()
    targets = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, Float8Linear)]
    for fqn, module in targets:
        unwrap_weight(module)
        parent_name, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), name, module.to_linear())
    log.info("float8: converted %d layers back to nn.Linear", len(targets))
    return model


def is_float8_model(model: nn.Module) -> bool:
    """True if ``model`` contains a ``Float8Linear``."""
    return any(isinstance(m, Float8Linear) for m in model.modules())


__all__ = [
    "auto_filter",
    "convert_back",
    "convert_to_float8_training",
    "default_filter",
    "default_skip_reason",
    "is_float8_model",
]
