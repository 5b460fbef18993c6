"""Fake-quant modules. Their parameters and state-dict keys are exactly those of the module they
replace (``weight``, ``bias``; LoRA: ``weight``, ``bias``, ``lora_a.weight``, ``lora_b.weight``), so a
QAT checkpoint is a plain float checkpoint. With learned ranges (:meth:`FakeQuantLinear.learn_ranges`)
a linear also holds ``weight_scale`` (and, for ``4w``, ``weight_zero``), ``[out_features, K // g]``:
the only extra keys, stored apart from the float weights (``qparams.safetensors``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qat.linear import fake_quant_linear, fake_quant_weight_ggml, fake_quant_weight_int_sym
from lowbit.qat.schemes import Scheme
from lowbit.quant.affine import (
    mse_symmetric_scale,
    mse_tinygemm_qparams,
    symmetric_scale,
    tinygemm_qparams,
)

QPARAM_NAMES = ("weight_scale", "weight_zero")
RANGE_INITS = ("minmax", "mse")  # how learned ranges start (FakeQuantLinear.learn_ranges)


class LearnedRanges:
    """Mixin: trainable per-group weight qparams, initialised from the min / max qparams of today's weight.

    ``weight_scale`` ``[N, K // g]`` (symmetric schemes: ``clamp(round(w / scale))`` codes; ``4w``:
    tinygemm codes with a float ``weight_zero`` of the same shape), in the weight's dtype, trained with
    LSQ gradients. The forward with these qparams equals the converted model's (``convert`` writes them
    into the torchao tensors).
    """

    def learn_ranges(self, init: str = "minmax") -> None:
        """Register ``weight_scale`` (and ``weight_zero`` for ``4w``) from the current weight.

        Args:
            init: ``"minmax"``: the min / max qparams of the weight (what PTQ uses); ``"mse"``: per
                group, min / max shrunk to the range whose fake quant of the weight has the least
                squared error (:func:`lowbit.quant.affine.mse_symmetric_scale`).
        """
        s = self.scheme
        if s.group_size is None:
            raise ValueError(f"learned ranges need a per-group scheme; {s.name!r} has one scale per output "
                             "channel (use 8da4w, 4w or a sub-4-bit scheme)")
        if init not in RANGE_INITS:
            raise ValueError(f"learned ranges: unknown init {init!r}; choose one of {', '.join(RANGE_INITS)}")
        mse = init == "mse"
        with torch.no_grad():
            w = self.effective_weight().detach()
            if s.name == "4w":
                qparams = mse_tinygemm_qparams if mse else tinygemm_qparams
                scale, zero = qparams(w, s.group_size)
                self.weight_zero = nn.Parameter(zero.clone())
            else:
                qparams = mse_symmetric_scale if mse else symmetric_scale
                scale = qparams(w, *s.weight_range, group_size=s.group_size)
        self.weight_scale = nn.Parameter(scale.clone())

    def learned_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(scale, zero)`` if this layer learns its ranges, else None; the scale clamped to the smallest
        valid scale (as the min / max qparams are), so a scale trained to zero or below stays usable."""
        scale = self._parameters.get("weight_scale")
        if scale is None:
            return None
        return scale.clamp(min=self._min_scale()), self._parameters.get("weight_zero")

    def _min_scale(self) -> float:
        return 1e-6 if self.scheme.name == "4w" else torch.finfo(self.weight_scale.dtype).eps

    @torch.no_grad()
    def clamp_ranges_(self) -> int:
        """Raise learned scales below the smallest valid scale to it, in place; returns how many were."""
        if self._parameters.get("weight_scale") is None:
            return 0
        eps = self._min_scale()
        low = self.weight_scale < eps
        n = int(low.sum())
        if n:
            self.weight_scale.masked_fill_(low, eps)
        return n


class FakeQuantLinear(LearnedRanges, nn.Linear):
    """``nn.Linear`` whose forward simulates ``scheme``'s CPU inference numerics.

    Shapes: ``x[..., in_features] -> y[..., out_features]`` in ``x.dtype``. ``fake_quant_enabled=False``
    makes it a plain linear (used for "fake quant after N steps").
    """

    scheme: Scheme
    fake_quant_enabled: bool

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> FakeQuantLinear:
        """Wrap ``linear``, sharing its Parameters (no copy; works on the meta device)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.scheme = scheme
        new.fake_quant_enabled = True
        return new

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        return fake_quant_linear(x, self.weight, self.bias, self.scheme, self.learned_qparams())

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's Parameters."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}, fake_quant={self.fake_quant_enabled}"


class FakeQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with weight-only symmetric fake quant (int4 per group or int8 per row),
    matching torchao ``IntxWeightOnlyConfig`` (``scheme.embedding_config()``) on CPU.

    Shapes: ``idx[...] (int64) -> [..., embedding_dim]`` in ``weight.dtype``.
    """

    scheme: Scheme
    fake_quant_enabled: bool

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme: Scheme) -> FakeQuantEmbedding:
        """Wrap ``emb``, sharing its weight Parameter."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"):
            setattr(new, k, getattr(emb, k))
        new.weight = emb.weight
        new.scheme = scheme
        new.fake_quant_enabled = True
        return new

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.fake_quant_enabled and self.scheme.name in ("q4_0", "q8_0"):
            w = fake_quant_weight_ggml(w, self.scheme.name).to(w.dtype)
        elif self.fake_quant_enabled:
            g = self.scheme.group_size if self.scheme.embedding_bits == 4 else None
            w = fake_quant_weight_int_sym(w, self.scheme.embedding_bits, g)
        return F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` sharing this module's weight."""
        emb = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(emb)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"):
            setattr(emb, k, getattr(self, k))
        emb.weight = self.weight
        return emb

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}, fake_quant={self.fake_quant_enabled}"


def _lora_cls():
    from torchtune.modules.peft import LoRALinear

    return LoRALinear


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int,
                      alpha: float) -> torch.Tensor:
    """``W + ((alpha / rank) * B) @ A`` (``W [out, in]``, ``A [rank, in]``, ``B [out, rank]``), the same
    expression torchtune's ``get_merged_lora_ckpt`` uses."""
    return weight + (alpha / rank) * lora_b @ lora_a


def merged_lora_weight(module) -> torch.Tensor:
    """:func:`merge_lora_weight` of a ``LoRALinear``'s (or :class:`FakeQuantLoRALinear`'s) tensors."""
    return merge_lora_weight(module.weight, module.lora_a.weight, module.lora_b.weight, module.rank,
                             module.alpha)


class FakeQuantLoRALinear(LearnedRanges, nn.Module):
    """A torchtune ``LoRALinear`` whose forward fake-quantizes the *merged* weight.

    LoRA adapters are merged into the base weight before deployment (torchtune's
    ``get_merged_lora_ckpt``), and it is the merged weight that the inference config quantizes. So the
    simulation that equals the deployed model is ``fake_quant_linear(x, W + (alpha/r) B A)``: the
    adapters are fake-quantized as part of the merged weight, never separately. Gradients reach
    ``lora_a`` / ``lora_b`` through the straight-through estimator; the frozen base weight stays frozen.
    Requires ``dropout == 0`` (the merged form has no place for adapter-input dropout) and a float base
    (not NF4 / DoRA).

    Holds the original ``LoRALinear`` submodules' parameters under the same names.
    """

    def __init__(self, lora, scheme: Scheme):
        super().__init__()
        self.in_dim, self.out_dim = lora.in_dim, lora.out_dim
        self.rank, self.alpha = lora.rank, lora.alpha
        self.use_bias = lora.use_bias
        self.weight = lora.weight
        self.bias = lora.bias
        self.lora_a = lora.lora_a
        self.lora_b = lora.lora_b
        self.disabled = lora.disabled
        self.scheme = scheme
        self.fake_quant_enabled = True

    @property
    def in_features(self) -> int:
        return self.in_dim

    @property
    def out_features(self) -> int:
        return self.out_dim

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight"]

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.disabled else merged_lora_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if not self.fake_quant_enabled:
            return F.linear(x, w, self.bias)
        return fake_quant_linear(x, w, self.bias, self.scheme, self.learned_qparams())

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (a new, detached Parameter)."""
        with torch.no_grad():
            w = self.weight if self.disabled else merged_lora_weight(self)
        lin = nn.Linear(self.in_dim, self.out_dim, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
                f"scheme={self.scheme}, fake_quant={self.fake_quant_enabled}")
