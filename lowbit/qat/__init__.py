"""Quantization-aware training: fake-quant wrappers bit-identical to torchao CPU inference."""

from lowbit.qat.schemes import SCHEMES, Scheme, get_scheme

__all__ = ["SCHEMES", "Scheme", "get_scheme"]
