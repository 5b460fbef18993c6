"""Quantization-aware training: fake-quant wrappers bit-identical to torchao CPU inference.

``prepare(model, "8da4w")`` -> train -> ``convert(model)`` gives the torchao-quantized CPU model whose
forward the prepared model simulated.
"""

from lowbit.qat.api import (
    convert,
    convert_checkpoint_model,
    enable_fake_quant,
    fake_quant_modules,
    get_prepared_scheme,
    prepare,
    unprepare,
)
from lowbit.qat.modules import FakeQuantEmbedding, FakeQuantLinear, FakeQuantLoRALinear
from lowbit.qat.schemes import SCHEMES, Scheme, get_scheme

__all__ = [
    "SCHEMES",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "FakeQuantLoRALinear",
    "Scheme",
    "convert",
    "convert_checkpoint_model",
    "enable_fake_quant",
    "fake_quant_modules",
    "get_prepared_scheme",
    "get_scheme",
    "prepare",
    "unprepare",
]
