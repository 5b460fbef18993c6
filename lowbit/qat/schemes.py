"""QAT schemes: one per CPU inference target (torchao 0.14.1 ``quantize_`` configs).

Each scheme knows the inference config it simulates, which layers it can quantize (``fits``) and
how its fake-quant numerics are parametrised (weight bits / granularity / activation quant).

| name    | torchao config                                                               |
|---------|------------------------------------------------------------------------------|
| 8da4w   | Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, PerGroup(g)) |
| 4w      | Int4WeightOnlyConfig(group_size=g, int4_packing_format="opaque")            |
| 8w      | Int8WeightOnlyConfig()                                                       |
| 8da8w   | Int8DynamicActivationInt8WeightConfig()                                      |
| q4_0    | llama.cpp Q4_0 weights, Q8_0 activations (``lowbit export --to gguf``)       |
| q8_0    | llama.cpp Q8_0 weights, Q8_0 activations (``lowbit export --to gguf``)       |
| 8da3w   | Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int3, PerGroup(g)) |
| 8da2w   | Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int2, PerGroup(g)) |
| 3w      | IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(g))      |
| 2w      | IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(g))      |

The sub-4-bit schemes are symmetric per group (int3: codes -4..3, scale = amax / 3.5; int2: -2..1,
scale = amax / 1.5), the same ``IntxUnpackedToInt8Tensor`` numerics as ``8da4w`` with fewer codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Group sizes the torchao CPU kernels accept (Int4OpaqueTensor asserts 32/64/128).
_INT4_OPAQUE_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Scheme:
    """A QAT scheme.

    Attributes:
        name: ``"8da4w" | "4w" | "8w" | "8da8w" | "8da3w" | "8da2w" | "3w" | "2w"``.
        group_size: weight group size along ``in_features`` (None = per output channel).
        weight_bits: 2, 3, 4 or 8.
        weight_symmetric: int4/int8 symmetric (``8da4w``, ``8w``, ``8da8w``) or uint4 asymmetric
            tinygemm-style (``4w``).
        activation: ``None`` (weight-only), ``"int8_asym_per_token"``, ``"int8_sym_per_token"`` or
            ``"q8_0"`` (llama.cpp's Q8_0 blocks of 32, the ggml schemes ``q4_0`` / ``q8_0``).
    """

    name: str
    group_size: int | None
    weight_bits: int
    weight_symmetric: bool
    activation: str | None

    def inference_config(self):
        """The torchao 0.14.1 ``quantize_`` config this scheme simulates (CPU inference)."""
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8DynamicActivationIntxWeightConfig,
            Int8WeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup

        if self.name in ("8da4w", "8da3w", "8da2w"):
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=self.weight_int_dtype, weight_granularity=PerGroup(self.group_size)
            )
        if self.name in ("3w", "2w"):
            from torchao.quantization import IntxWeightOnlyConfig

            return IntxWeightOnlyConfig(weight_dtype=self.weight_int_dtype,
                                        granularity=PerGroup(self.group_size))
        if self.name == "4w":
            return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="opaque")
        if self.name == "8w":
            return Int8WeightOnlyConfig()
        if self.name == "8da8w":
            return Int8DynamicActivationInt8WeightConfig()
        if self.name in GGML_SCHEMES:
            raise ValueError(f"scheme {self.name!r} simulates llama.cpp's {self.name.upper()} format; it has "
                             "no torchao config: deploy it with `lowbit export --to gguf`")
        raise AssertionError(self.name)

    def fits(self, module: nn.Module) -> bool:
        """Whether ``quantize_`` with this scheme's config quantizes ``module`` (a Linear).

        Layers that do not fit stay in float (prepare logs them) instead of half-quantized.
        """
        if not isinstance(module, nn.Linear):
            return False
        in_features = module.in_features
        block = self.group_size or in_features
        if block < 2:
            # torchao 0.14.1's reduction helper mis-shapes qparams for a block of 1 element
            return False
        if self.name == "8da8w":
            # torchao skips in_features <= 16 for this config (kept float)
            return in_features > 16
        if self.name == "4w" and module.out_features % 16 != 0:
            # _convert_weight_to_int4pack_for_cpu requires out_features divisible by 16
            return False
        if self.group_size is not None:
            return in_features % self.group_size == 0
        return True

    @property
    def weight_int_dtype(self) -> torch.dtype:
        """The torch integer dtype of the weights (``torch.int2`` ... ``torch.int8``)."""
        return getattr(torch, f"int{self.weight_bits}")

    @property
    def weight_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the weight codes: signed ``weight_bits`` integers, or uint4 for ``4w``."""
        if not self.weight_symmetric:
            return (0, 15)
        return (-(2 ** (self.weight_bits - 1)), 2 ** (self.weight_bits - 1) - 1)

    @property
    def embedding_bits(self) -> int:
        """Embeddings are weight-only: int4 per group for the 4-bit and lower schemes, int8 per row else."""
        return 4 if self.weight_bits <= 4 else 8

    def embedding_config(self):
        """torchao ``IntxWeightOnlyConfig`` used for embeddings (int4 sym per group / int8 sym per row)."""
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        if self.embedding_bits == 4:
            return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))

    def fits_embedding(self, module: nn.Module) -> bool:
        """Whether an ``nn.Embedding`` can be weight-fake-quantized with this scheme."""
        if not isinstance(module, nn.Embedding):
            return False
        g = self.group_size if self.embedding_bits == 4 or self.name in GGML_SCHEMES else module.embedding_dim
        return g >= 2 and module.embedding_dim % g == 0

    def __str__(self) -> str:
        if self.group_size is None or self.name in GGML_SCHEMES:
            return self.name
        return f"{self.name}(group_size={self.group_size})"


_DEFAULT_GROUP_SIZE = {"8da4w": 32, "4w": 128, "8w": None, "8da8w": None,
                       "8da3w": 32, "8da2w": 32, "3w": 32, "2w": 32, "q4_0": 32, "q8_0": 32}
SCHEMES: tuple[str, ...] = tuple(_DEFAULT_GROUP_SIZE)
# Schemes that simulate llama.cpp's block formats (blocks of 32, lowbit.quant.ggml), exported to GGUF.
GGML_SCHEMES: tuple[str, ...] = ("q4_0", "q8_0")


def group_size_candidates(name: str) -> tuple[int, ...]:
    """Group sizes scheme ``name`` supports, largest first, none above its default (empty: per channel)."""
    default = _DEFAULT_GROUP_SIZE[name]
    if default is None:
        return ()
    if name in GGML_SCHEMES:
        return (32,)
    if name == "4w":
        return tuple(sorted(_INT4_OPAQUE_GROUP_SIZES, reverse=True))
    return tuple(default >> i for i in range(default.bit_length() - 1))  # 8da4w: 32, 16, ..., 2


def get_scheme(name: str, group_size: int | None = None) -> Scheme:
    """Return the :class:`Scheme` called ``name``.

    Args:
        name: one of ``SCHEMES`` (``"8da4w"``, ``"4w"``, ``"8w"``, ``"8da8w"``, ``"8da3w"``, ``"8da2w"``,
            ``"3w"``, ``"2w"``, ``"q4_0"``, ``"q8_0"``).
        group_size: weight group size for ``8da4w`` and the sub-4-bit schemes (positive power of two,
            default 32) and ``4w`` (32, 64 or 128, default 128). ``8w`` / ``8da8w`` are per-channel and
            reject a group size; ``q4_0`` / ``q8_0`` have llama.cpp's blocks of 32.

    Raises:
        ValueError: unknown ``name`` or a ``group_size`` the scheme / its kernel cannot use.
    """
    if name not in _DEFAULT_GROUP_SIZE:
        raise ValueError(f"unknown QAT scheme {name!r}; expected one of {list(SCHEMES)}")
    if _DEFAULT_GROUP_SIZE[name] is None:
        if group_size is not None:
            raise ValueError(
                f"scheme {name!r} quantizes weights per output channel; group_size must be None, "
                f"got {group_size!r}"
            )
        return Scheme(name, None, 8, True, "int8_sym_per_token" if name == "8da8w" else None)
    if name in GGML_SCHEMES:
        if group_size not in (None, 32):
            raise ValueError(f"scheme {name!r} (llama.cpp {name.upper()}) has blocks of 32; group_size must "
                             f"be None or 32, got {group_size!r}")
        return Scheme(name, 32, 4 if name == "q4_0" else 8, True, "q8_0")
    if group_size is None:
        group_size = _DEFAULT_GROUP_SIZE[name]
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or group_size & (group_size - 1)
    ):
        raise ValueError(f"group_size must be a positive power of two, got {group_size!r}")
    if name == "4w":
        if group_size not in _INT4_OPAQUE_GROUP_SIZES:
            raise ValueError(
                f"scheme '4w' (Int4WeightOnlyConfig opaque CPU kernel) supports group_size in "
                f"{_INT4_OPAQUE_GROUP_SIZES}, got {group_size}"
            )
        return Scheme(name, group_size, 4, False, None)
    bits = int(name.removeprefix("8da")[0])
    return Scheme(name, group_size, bits, True, "int8_asym_per_token" if name.startswith("8da") else None)
