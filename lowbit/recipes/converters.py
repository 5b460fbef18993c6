"""Model converters from the recipe config: objects with ``convert(model)`` (applied after the recipe's
``prepare_model``, before FSDP sharding) and ``post_optimizer_hook(model)`` (after each optimizer step).

Today the only one is float8, from the ``float8`` config node::

    float8:
      recipe: tensorwise                         # tensorwise | rowwise | rowwise_with_gw_hp; null: off
      emulate: false                             # plain matmuls instead of torch._scaled_mm
      grad_output_dtype: null                    # e4m3 | e5m2; null: the recipe's
      enable_fsdp_float8_all_gather: false       # FSDP2 all-gathers weights in float8 (tensorwise)
      precompute_float8_scales_for_fsdp: false   # one all-reduce per step for all the scales
"""

from __future__ import annotations

import dataclasses
import logging

from omegaconf import DictConfig

from lowbit.recipes.config import ConfigError
from lowbit.recipes.distributed import Runtime

log = logging.getLogger("lowbit")

def model_converters(cfg: DictConfig, rt: Runtime) -> list:
    """The converters ``cfg`` asks for, in the order they apply."""
    f8 = cfg.get("float8")
    if not f8 or not f8.get("recipe"):
        return []
    from lowbit.float8 import Float8Converter, Float8TrainingConfig

    all_gather = bool(f8.get("enable_fsdp_float8_all_gather") or False)
    precompute = bool(f8.get("precompute_float8_scales_for_fsdp") or False)
    try:
        config = Float8TrainingConfig.from_recipe(
            f8.recipe, emulate=bool(f8.get("emulate", False)), grad_output_dtype=f8.get("grad_output_dtype"),
            enable_fsdp_float8_all_gather=all_gather)
        converter = Float8Converter(config, precompute_scales=precompute)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'float8': {e}") from e
    if all_gather and not rt.distributed:
        # as torchtitan: the float8 all-gather is an FSDP feature; one process has nothing to gather
        log.info("float8: enable_fsdp_float8_all_gather has no effect on one process")
        converter = Float8Converter(dataclasses.replace(config, enable_fsdp_float8_all_gather=False))
    return [converter]
