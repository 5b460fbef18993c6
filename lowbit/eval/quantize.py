"""Quantize a float model for CPU inference with torchao ``quantize_`` (the lowbit hand-off, through
:func:`lowbit.eval.deploy`).

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

import torch
from torch import nn

from lowbit.eval.deployment import INFERENCE_SCHEMES, deploy
from lowbit.qat.inference import Int8DynActInt4Linear

__all__ = ["INFERENCE_SCHEMES", "Int8DynActInt4Linear", "model_bytes", "quantize_for_inference"]


def quantize_for_inference(
    model: nn.Module, scheme: str | None, *, group_size: int | None = None, dtype: torch.dtype | None = None,
    qparams: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place for CPU inference and return it (:func:`lowbit.eval.deploy`).

    Args:
        model: a float model on CPU (e.g. a torchtune ``TransformerDecoder``), fp32 or bf16.
        scheme: ``None`` / ``"none"`` (unchanged), ``"8w"``, ``"8da8w"``, ``"4w"``, ``"8da4w"`` (or the
            ggml simulations ``"q4_0"`` / ``"q8_0"``).
        group_size: weight group size for ``4w`` (32/64/128) and ``8da4w``; default: the largest the
            kernel supports (128 for ``4w``, 32 for ``8da4w`` at most) that divides the model's widths.
            Must be None for the per-channel schemes.
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
        ValueError: unknown scheme, bad group size or dtype, a parameter not on CPU, or most linears
            not fitting the scheme.
    """
    return deploy(model, scheme, group_size=group_size, dtype=dtype, qparams=qparams)


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
