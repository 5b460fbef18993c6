"""llama.cpp's (ggml's) Q4_0 / Q8_0 block formats: quantize, dequantize, fake quant, pack for GGUF.

Blocks of :data:`QK` = 32 consecutive values along the last dim, one fp16 scale ``d`` per block.

- Q4_0 weights (``quantize_row_q4_0_ref``): ``m`` = the block's value of largest magnitude (first one
  on ties, sign kept), ``d = m / -8``, ``q = min(15, trunc(x * (1/d) + 8.5))`` in fp32, stored as
  ``uint4``; value ``(q - 8) * fp16(d)``. (So ``m`` itself is exactly ``-8 * d``; ``-m`` clips to 7.)
- Q8_0 weights (``quantize_row_q8_0_ref``): ``d = amax / 127``, ``q = roundf(x * (1/d))`` (half away from
  zero); value ``q * fp16(d)``.
- Q8_0 activations, as llama.cpp's x86 CPU matmuls quantize the input row before
  ``vec_dot_q4_0_q8_0`` / ``vec_dot_q8_0_q8_0`` (``quantize_row_q8_0``, AVX path): ``d = amax / 127``
  stored fp16, ``q = round_half_even(x * (127 / amax))``. The dot product is then
  ``sum_blocks fp16(d_w) * fp16(d_x) * sum(q_w * q_x)``, which ``F.linear`` of the two fake-quantized
  operands equals up to fp32 summation order.

All functions take fp32 (other float dtypes are converted) with the last dim divisible by 32; scales are
computed without gradient and the fake-quant functions pass gradients straight through.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32  # values per block, Q4_0 and Q8_0
Q4_0_BLOCK_BYTES = 2 + QK // 2
Q8_0_BLOCK_BYTES = 2 + QK


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % QK:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the ggml block size {QK}")
    return x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exact for every fp32 (``floor(|v| + 0.5)`` is not)."""
    a = v.abs()
    f = a.floor()
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[..., K]`` -> ``(q[..., K // 32, 32] uint8 in [0, 15], d[..., K // 32] fp16)``."""
    b = _blocks(w)
    idx = b.abs().argmax(-1, keepdim=True)  # first index of the largest |x|, as the C loop's strict "<"
    d = b.gather(-1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return q, d.squeeze(-1).half()


def dequantize_q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 ``(q - 8) * d`` with the block dims merged back: ``[..., K]``."""
    v = (q.float() - 8) * d.float().unsqueeze(-1)
    return v.reshape(*v.shape[:-2], -1)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[..., K]`` -> ``(q[..., K // 32, 32] int8, d[..., K // 32] fp16)`` (the reference rule)."""
    b = _blocks(w)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(b * inv).clamp(-128, 127).to(torch.int8)
    return q, d.squeeze(-1).half()


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * d`` with the block dims merged back: ``[..., K]``."""
    v = q.float() * d.float().unsqueeze(-1)
    return v.reshape(*v.shape[:-2], -1)


def quant_dequant_act_q8_0(x: torch.Tensor) -> torch.Tensor:
    """fp32 Q8_0 quant-dequant of activations ``x[..., K]`` by llama.cpp's x86 rule (see module doc)."""
    b = _blocks(x)
    amax = b.abs().amax(-1, keepdim=True)
    d = (amax / 127).half().float()
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127 / amax)
    q = torch.round(b * inv).clamp(-127, 127)
    v = q * d
    return v.reshape(*v.shape[:-2], -1)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def fake_quant_q4_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 Q4_0 quant-dequant of ``w[..., K]`` (values equal what llama.cpp dequantizes)."""
    return _StraightThrough.apply(w, dequantize_q4_0(*quantize_q4_0(w)))


def fake_quant_q8_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 Q8_0 quant-dequant of ``w[..., K]``."""
    return _StraightThrough.apply(w, dequantize_q8_0(*quantize_q8_0(w)))


def fake_quant_act_q8_0(x: torch.Tensor) -> torch.Tensor:
    """fp32 Q8_0 activation quant-dequant with a straight-through gradient."""
    return _StraightThrough.apply(x, quant_dequant_act_q8_0(x))


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """GGUF bytes of Q4_0 blocks: per block the fp16 ``d`` then 16 bytes, byte ``j`` holding value ``j``
    in its low nibble and value ``j + 16`` in its high nibble. Returns uint8 ``[..., K // 32 * 18]``."""
    qs = q.numpy()
    nibbles = qs[..., : QK // 2] | (qs[..., QK // 2:] << 4)
    dd = d.numpy().astype("<f2").view(np.uint8).reshape(*d.shape, 2)
    out = np.concatenate([dd, nibbles.astype(np.uint8)], axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """GGUF bytes of Q8_0 blocks: per block the fp16 ``d`` then the 32 int8 values.
    Returns uint8 ``[..., K // 32 * 34]``."""
    dd = d.numpy().astype("<f2").view(np.uint8).reshape(*d.shape, 2)
    out = np.concatenate([dd, q.numpy().view(np.uint8)], axis=-1)
    return out.reshape(*out.shape[:-2], -1)
