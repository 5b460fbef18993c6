"""Fake-quantized linear forwards, one per scheme, each reproducing its torchao CPU inference path.

Every function takes ``x[..., K]``, ``weight[N, K]``, optional ``bias[N]`` and returns ``y[..., N]`` in
``x.dtype``; gradients use the straight-through estimator (identity, zero where clipped).

- ``8da4w`` (and ``8da3w`` / ``8da2w``): torchao's ``IntxUnpackedToInt8Tensor`` linear = quant-dequant
  the activation (int8 asym per token, eps = finfo(x.dtype).eps), dequantize the intN sym per-group
  weight, ``F.linear``. We run the same ops, so the outputs are bit-identical.
- ``3w`` / ``2w``: the same weight numerics without the activation quant (``IntxWeightOnlyConfig``).
- ``4w``: ``_weight_int4pack_mm_for_cpu`` dequantizes uint4 weights in fp32 and accumulates in fp32;
  we do the same with ``F.linear`` in fp32 (identical in bf16 in practice, fp32 differs only in
  accumulation order: well under 1 bf16 ulp).
- ``8w``: ``mm(x, int8_w.T) * scale (+ bias)`` as torchao's plain-layout int8 weight-only linear.
- ``8da8w``: ``_int_mm(int8_x, int8_w.T)`` (exact int32), ``* x_scale``, ``* w_scale`` (+ bias). The
  integer product is computed exactly in fp32 (small K) or fp64, so it equals the int32 result.
- ``q4_0`` / ``q8_0``: llama.cpp's block formats (``lowbit.quant.ggml``): fp32 weights quantized in
  blocks of 32, activations quantized to Q8_0 blocks as llama.cpp's CPU matmuls do (``activation=None``
  in the scheme turns that off), fp32 ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.quant import ggml
from lowbit.quant.affine import (
    INT4,
    INT8,
    INT8_REDUCED,
    asymmetric_qparams,
    fake_quantize,
    fake_quantize_learned,
    fake_quantize_tinygemm,
    fake_quantize_tinygemm_learned,
    quantize,
    symmetric_scale,
)

_FP32_EPS = torch.finfo(torch.float32).eps


def int_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of a signed ``bits``-bit integer."""
    return INT4 if bits == 4 else INT8 if bits == 8 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def fake_quant_weight_int_sym(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric intN (per group) / int8 (per group or row) fake quant, torchao ``IntxUnpackedToInt8``.

    qparams: ``scale = amax / ((qmax - qmin) / 2)``, eps = finfo(weight.dtype).eps, zero point 0 (int8).
    """
    qmin, qmax = int_range(bits)
    scale = symmetric_scale(weight.detach(), qmin, qmax, group_size=group_size)
    zero_point = torch.zeros_like(scale, dtype=torch.int8)
    return fake_quantize(weight, scale, zero_point, qmin, qmax, group_size=group_size)


def fake_quant_act_int8_asym_per_token(x: torch.Tensor) -> torch.Tensor:
    """torchao ``_apply_int8_act_asym_per_token_quant_dequant``: int8 asym per token, eps of x.dtype."""
    scale, zero_point = asymmetric_qparams(x.detach(), *INT8)
    return fake_quantize(x, scale, zero_point, *INT8)


def linear_8da4w(x, weight, bias, group_size: int, bits: int = 4):
    """int8 dynamic asym per-token activations, intN (default int4) symmetric per-group weights."""
    x_fq = fake_quant_act_int8_asym_per_token(x)
    w_fq = fake_quant_weight_int_sym(weight, bits, group_size)
    return F.linear(x_fq, w_fq, bias)


def linear_intxw(x, weight, bias, group_size: int, bits: int):
    """intN symmetric per-group weight-only (``IntxWeightOnlyConfig``): dequantize, ``F.linear``."""
    return F.linear(x, fake_quant_weight_int_sym(weight, bits, group_size), bias)


def linear_4w(x, weight, bias, group_size: int):
    """uint4 asymmetric per-group (tinygemm) weight-only, fp32 dequant + fp32 accumulation."""
    w_fq = fake_quantize_tinygemm(weight, group_size, dtype=torch.float32)
    y = F.linear(x.float(), w_fq).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y


def linear_8w(x, weight, bias):
    """int8 symmetric per-channel weight-only: ``mm(x, q.T) * scale + bias``."""
    scale = symmetric_scale(weight.detach(), *INT8, eps=_FP32_EPS)  # [N, 1]
    zero_point = torch.zeros_like(scale, dtype=torch.int64)
    q = quantize(weight, scale, zero_point, *INT8, ste=True)  # integer-valued, weight.dtype
    m = torch.mm(x.reshape(-1, x.shape[-1]), q.t().to(x.dtype))
    y = m * scale.squeeze(-1).to(m.dtype)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if bias is not None:
        y = y + bias.to(m.dtype)
    return y


def _exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for integer-valued a (|a| <= 127) and b (|b| <= 128), exactly (as int32 would be).

    fp32 is exact while every partial sum stays below 2**24; beyond that use fp64. Returns fp32.
    """
    k = a.shape[-1]
    if k * 127 * 128 < 2**24:
        return torch.mm(a.float(), b.float())
    return torch.mm(a.double(), b.double()).float()


def linear_8da8w(x, weight, bias):
    """int8 symmetric per-token activations (range +-127, eps 1e-5), int8 symmetric per-channel weights."""
    x_scale_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    x_scale = symmetric_scale(x.detach(), *INT8_REDUCED, eps=1e-5, scale_dtype=x_scale_dtype)  # [..., 1]
    x_q = quantize(x, x_scale, torch.zeros_like(x_scale), *INT8_REDUCED, ste=True)
    w_scale = symmetric_scale(weight.detach(), *INT8, eps=_FP32_EPS)  # [N, 1]
    w_q = quantize(weight, w_scale, None, *INT8, ste=True)
    c = _exact_int_mm(x_q.reshape(-1, x.shape[-1]), w_q.t())  # == torch._int_mm(int8, int8) as fp32
    inter = torch.float32 if x_scale_dtype == torch.half else x_scale_dtype
    y = c.to(inter) * x_scale.reshape(-1, 1).to(inter)
    y = y.to(x_scale_dtype)
    y = (y * w_scale.squeeze(-1)).reshape(*x.shape[:-1], c.shape[-1])
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y


def fake_quant_weight_ggml(weight: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 Q4_0 / Q8_0 quant-dequant of ``weight[..., K]`` (what llama.cpp dequantizes)."""
    return ggml.fake_quant_q4_0(weight) if name == "q4_0" else ggml.fake_quant_q8_0(weight)


def linear_ggml(x, weight, bias, scheme):
    """llama.cpp Q4_0 / Q8_0 weights (x Q8_0 activations if ``scheme.activation``), fp32 compute."""
    xf = x.float()
    if scheme.activation is not None:
        xf = ggml.fake_quant_act_q8_0(xf)
    y = F.linear(xf, fake_quant_weight_ggml(weight, scheme.name))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fake_quant_linear(x, weight, bias, scheme, qparams=None) -> torch.Tensor:
    """Dispatch to the scheme's fake-quantized linear (``scheme`` is a :class:`~lowbit.qat.Scheme`).

    ``qparams``: learned weight qparams ``(scale, zero)`` (``[N, K // g]`` each; ``zero`` is None for the
    symmetric schemes), see :func:`learned_weight`; None = computed from the weight (min / max).
    """
    if qparams is not None:
        w_fq = learned_weight(weight, scheme, *qparams)
        if scheme.name == "4w":
            y = F.linear(x.float(), w_fq).to(x.dtype)
            return y if bias is None else y + bias
        if scheme.activation is not None:
            x = fake_quant_act_int8_asym_per_token(x)
        return F.linear(x, w_fq, bias)
    if scheme.name in ("8da4w", "8da3w", "8da2w"):
        return linear_8da4w(x, weight, bias, scheme.group_size, scheme.weight_bits)
    if scheme.name in ("3w", "2w"):
        return linear_intxw(x, weight, bias, scheme.group_size, scheme.weight_bits)
    if scheme.name == "4w":
        return linear_4w(x, weight, bias, scheme.group_size)
    if scheme.name == "8w":
        return linear_8w(x, weight, bias)
    if scheme.name == "8da8w":
        return linear_8da8w(x, weight, bias)
    if scheme.name in ("q4_0", "q8_0"):
        return linear_ggml(x, weight, bias, scheme)
    raise ValueError(f"unknown scheme {scheme.name!r}")


def learned_weight(weight: torch.Tensor, scheme, scale: torch.Tensor,
                   zero: torch.Tensor | None) -> torch.Tensor:
    """The fake-quantized weight ``[N, K]`` with learned qparams (LSQ gradients to ``scale`` / ``zero``).

    Symmetric per-group schemes: ``zero`` is None and the codes are ``clamp(round(w / scale))``
    (:func:`~lowbit.quant.affine.fake_quantize_learned`), in ``weight.dtype``. ``4w``: tinygemm codes
    with a float ``zero``, dequantized in fp32 as the CPU kernel does.
    """
    if scheme.name == "4w":
        return fake_quantize_tinygemm_learned(weight, scale, zero, scheme.group_size, dtype=torch.float32)
    return fake_quantize_learned(weight, scale, None, *scheme.weight_range, group_size=scheme.group_size)
