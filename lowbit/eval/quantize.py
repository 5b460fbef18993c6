"""Quantize a float model for CPU inference with torchao ``quantize_`` (the lowbit hand-off).

``quantize_for_inference(model, "4w")`` applies exactly the torchao config that the QAT scheme of the
same name simulates (``lowbit.qat.schemes.get_scheme(name).inference_config()``) to the ``nn.Linear``
layers the scheme fits; other layers (and torchtune's tied output head, which is not an ``nn.Linear``)
stay float.

Dtype: torchao's CPU weight-only kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) take
fp32 activations too, but only their bf16 path is vectorized: on an AVX2 CPU a 1x1024 @ 1024x2816 decode
GEMV takes 2.8 ms with fp32 activations and 0.2 ms with bf16. So ``4w``, ``8w`` and ``8da4w`` cast the
model to bf16 unless ``dtype`` says otherwise; ``8da8w`` and ``none`` keep the model's dtype.

``8da4w`` in bf16: torchao 0.14.1 on x86 without its C++ extension only simulates the scheme (dequantize
the whole int4 weight to float on every call, then a float matmul). We repack the same integer weights
and scales into the tinygemm int4 layout (``w = (q_u - 8) * scale + zero`` with ``q_u = q + 8`` and
``zero = -zero_point * scale``, exact) and run ``_weight_int4pack_mm_for_cpu`` on the fake-quantized
int8 activations (torchao's own per-token asymmetric quant-dequant): :class:`Int8DynActInt4Linear`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.quant.affine import quant_dequant_int8_per_token_asym

log = logging.getLogger(__name__)

INFERENCE_SCHEMES: tuple[str, ...] = ("none", "8w", "8da8w", "4w", "8da4w", "8da3w", "8da2w", "3w", "2w")

# Activation dtype of the fast CPU kernel behind each scheme (None: keep the model's dtype).
_KERNEL_DTYPE: dict[str, torch.dtype | None] = {
    "none": None, "8da8w": None, "8w": torch.bfloat16, "4w": torch.bfloat16, "8da4w": torch.bfloat16,
    "8da3w": torch.bfloat16, "8da2w": torch.bfloat16, "3w": None, "2w": None,
}
# Schemes whose int8-activation / int2..int4-weight layers run on the tinygemm int4 kernel in bf16.
_INT4PACK_SCHEMES = ("8da4w", "8da3w", "8da2w")
_DTYPES = (torch.float32, torch.bfloat16)


@contextmanager
def _keep_global_config():
    """Undo what torchao's ``set_inductor_config=True`` does to global state during ``quantize_``."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.get_config_copy()
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        inductor_config.load_config(saved)
        torch.set_float32_matmul_precision(precision)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def resolve_scheme(scheme: str | None, group_size: int | None = None):
    """``None`` for no quantization, else the ``lowbit.qat`` :class:`Scheme` (validates both args)."""
    if scheme is None or scheme == "none":
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} given but scheme is {scheme!r} (no quantization)")
        return None
    if not isinstance(scheme, str) or scheme not in INFERENCE_SCHEMES:
        raise ValueError(f"unknown inference scheme {scheme!r}; expected one of {list(INFERENCE_SCHEMES)}")
    from lowbit.qat.schemes import get_scheme

    return get_scheme(scheme, group_size)


def quantize_for_inference(
    model: nn.Module, scheme: str | None, *, group_size: int | None = None, dtype: torch.dtype | None = None,
    qparams: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place for CPU inference and return it.

    Args:
        model: a float model on CPU (e.g. a torchtune ``TransformerDecoder``), fp32 or bf16.
        scheme: ``None`` / ``"none"`` (unchanged), ``"8w"``, ``"8da8w"``, ``"4w"`` or ``"8da4w"``.
        group_size: weight group size for ``4w`` (32/64/128, default 128) and ``8da4w`` (default 32);
            must be None for the per-channel schemes.
        dtype: dtype of the float parts and activations (``torch.float32`` or ``torch.bfloat16``).
            Default: bf16 for ``4w`` / ``8w`` / ``8da4w`` (their fast CPU kernels take bf16), else the
            model's dtype. Pass ``torch.float32`` to reproduce fp32 fake-quant numerics exactly.
        qparams: learned QAT qparams (``{"<layer>.weight_scale": ..., "<layer>.weight_zero": ...}``, a
            checkpoint's ``meta["qat_qparams"]``): those layers get codes and qparams from them
            (``lowbit.qat.write_learned_qparams``) instead of the weight's min / max.

    Returns:
        ``model``, its fitting ``nn.Linear`` weights replaced by torchao quantized tensors (and, for
        ``8da4w`` in bf16, those layers replaced by :class:`Int8DynActInt4Linear`).

    Raises:
        ValueError: unknown scheme, bad group size or dtype, or a parameter not on CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    s = resolve_scheme(scheme, group_size)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise ValueError(
                f"quantize_for_inference is for CPU inference; parameter {name!r} is on {p.device}"
            )
    name = "none" if s is None else s.name
    target = dtype or _KERNEL_DTYPE[name] or _float_dtype(model)
    if target not in _DTYPES:
        raise ValueError(f"model dtype {target} not supported; pass dtype=torch.float32 or torch.bfloat16")
    model.to(target)
    if s is None:
        return model

    from torchao.quantization import quantize_

    skipped = []

    def fits(module: nn.Module, fqn: str) -> bool:
        if isinstance(module, nn.Linear) and not s.fits(module):
            skipped.append(fqn)
        return s.fits(module)

    learned = _group_qparams(qparams or {})
    floats = {fqn: model.get_submodule(fqn).weight.detach().clone() for fqn in learned}
    with _keep_global_config():
        quantize_(model, s.inference_config(), filter_fn=fits)
    if skipped:
        log.info("scheme %s: %d linear layer(s) kept in float: %s", s.name, len(skipped), skipped)
    if learned:
        from lowbit.qat.api import write_learned_qparams

        for fqn, (scale, zero) in learned.items():
            weight = model.get_submodule(fqn).weight
            if type(weight) in (torch.Tensor, nn.Parameter):
                raise ValueError(f"learned qparams for layer {fqn!r}, which scheme {s} does not quantize")
            write_learned_qparams(weight, floats[fqn], s, scale, zero)
    if s.name in _INT4PACK_SCHEMES and target == torch.bfloat16:
        _swap_8da4w_to_int4pack(model)
    return model


def _group_qparams(qparams: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{"<fqn>.weight_scale": s, "<fqn>.weight_zero": z}`` -> ``{fqn: (s, z or None)}``."""
    out: dict[str, tuple] = {}
    for key in qparams:
        fqn, _, name = key.rpartition(".")
        if name == "weight_scale":
            out[fqn] = (qparams[key], qparams.get(f"{fqn}.weight_zero"))
        elif name != "weight_zero":
            raise ValueError(f"unknown learned qparam {key!r} (expected <layer>.weight_scale / .weight_zero)")
    return out


class Int8DynActInt4Linear(nn.Module):
    """``8da4w`` linear on the CPU tinygemm int4 kernel.

    ``y = fq8(x) @ W.T + b`` where ``fq8`` is torchao's int8 asymmetric per-token quant-dequant and
    ``W = q * scale`` (int4 symmetric per group). Shapes: x ``(..., in_features)`` bf16 ->
    ``(..., out_features)`` bf16. Buffers: ``packed`` (the ``_convert_weight_to_int4pack_for_cpu``
    layout of ``q + 8``) and ``scale_and_zero`` ``(in_features // group_size, out_features, 2)`` bf16.
    """

    def __init__(self, packed: torch.Tensor, scale_and_zero: torch.Tensor, in_features: int,
                 out_features: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_intx(cls, weight, bias: torch.Tensor | None) -> Int8DynActInt4Linear:
        """Repack a torchao ``IntxUnpackedToInt8Tensor`` (int4 per-group, int8 asym per-token acts)."""
        n, k = weight.shape
        g = weight.block_size[-1]
        if weight.block_size[0] != 1 or k % g:
            raise ValueError(f"expected per-group int4 weight, got block_size {weight.block_size}")
        scale = weight.scale.reshape(n, k // g)
        zero_point = weight.zero_point.reshape(n, k // g).to(torch.int32)
        q = weight.qdata.to(torch.int32)
        if q.min() < -8 or q.max() > 7:
            raise ValueError("8da4w weight values outside the int4 range [-8, 7]")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).contiguous(), 1)
        # tinygemm dequant: (q_u - 8) * scale + zero == (q - zero_point) * scale
        zero = (-zero_point.to(torch.float32) * scale.to(torch.float32)).to(scale.dtype)
        scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scale_and_zero, k, n, g, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quant_dequant_int8_per_token_asym(x)  # torchao's numbers, a quarter of the eager op count
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).contiguous(), self.packed, self.group_size, self.scale_and_zero
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )


def _swap_8da4w_to_int4pack(model: nn.Module) -> None:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and isinstance(child.weight, IntxUnpackedToInt8Tensor):
                setattr(parent, child_name, Int8DynActInt4Linear.from_intx(child.weight, child.bias))


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers, tied tensors counted once).

    Tensor subclasses are counted by their inner tensors (packed int4 codes, scales, zero points);
    KV caches (non-persistent buffers) are not counted.
    """
    seen = {id(t): t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    return sum(_tensor_bytes(t) for t in seen.values())


def _tensor_bytes(t: torch.Tensor) -> int:
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
