"""Quantization-aware training: fake-quant wrappers bit-identical to torchao CPU inference.

``prepare(model, "8da4w")`` -> train -> ``convert(model)`` gives the torchao-quantized CPU model whose
forward the prepared model simulated.
"""

from lowbit.qat.api import (
    clamp_learned_ranges_,
    convert,
    convert_checkpoint_model,
    enable_fake_quant,
    fake_quant_modules,
    get_prepared_scheme,
    learned_qparams,
    load_learned_qparams,
    prepare,
    unprepare,
    write_learned_qparams,
)
from lowbit.qat.modules import FakeQuantEmbedding, FakeQuantLinear, FakeQuantLoRALinear
from lowbit.qat.schemes import SCHEMES, Scheme, get_scheme

__all__ = [
    "SCHEMES",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "FakeQuantLoRALinear",
    "Scheme",
    "clamp_learned_ranges_",
    "convert",
    "convert_checkpoint_model",
    "enable_fake_quant",
    "fake_quant_modules",
    "get_prepared_scheme",
    "get_scheme",
    "learned_qparams",
    "load_learned_qparams",
    "prepare",
    "unprepare",
    "write_learned_qparams",
]
