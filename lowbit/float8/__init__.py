"""float8 training: swap ``nn.Linear`` for ``Float8Linear`` (dynamic scaling, three recipes).

    from lowbit.float8 import Float8TrainingConfig, convert_to_float8_training, convert_back

    model = convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe("tensorwise"))
    ...train...
    convert_back(model)  # plain nn.Linear again, same parameters
"""

from lowbit.float8.config import RECIPES, Float8TrainingConfig
from lowbit.float8.convert import (
    auto_filter,
    convert_back,
    convert_to_float8_training,
    default_filter,
    default_skip_reason,
    is_float8_model,
)
from lowbit.float8.converter import Float8Converter
from lowbit.float8.fsdp import precompute_float8_scales_for_fsdp
from lowbit.float8.linear import Float8Linear, check_float8_hardware

__all__ = [
    "RECIPES",
    "Float8Converter",
    "Float8Linear",
    "Float8TrainingConfig",
    "auto_filter",
    "check_float8_hardware",
    "convert_back",
    "convert_to_float8_training",
    "default_filter",
    "default_skip_reason",
    "is_float8_model",
    "precompute_float8_scales_for_fsdp",
]
