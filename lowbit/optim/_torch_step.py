"""Pure-torch Adam step over quantized states: any device, any float dtype.

Used where the fused CPU kernel is unavailable (no compiler), on CUDA, and for dtypes the
kernel does not take. Bit-identical to the kernel for fp32 / bf16 parameters: the same fp32
operations in the same order, the same exact nearest-code encode, the same bf16 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.quant import blockwise

from .formats import StateFormat

# order of the per-parameter fp32 hyper-parameters passed to the kernels
HYPER_FIELDS = ("b1", "omb1", "b2", "omb2", "eps", "step_size", "inv_bc2_sqrt", "decay", "wd")


def hyper_row(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float, decoupled: bool
) -> list[float]:
    """Per-step scalars in float64 (rounded once to fp32 by the caller), in ``HYPER_FIELDS`` order."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    return [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr / bc1, 1.0 / math.sqrt(bc2), decay, weight_decay]


_M32 = 0xFFFFFFFF


def _mul32(a: Tensor, b: int) -> Tensor:
    """``a * b mod 2**32`` for int64 ``a`` in ``[0, 2**32)`` without int64 overflow."""
    lo, hi = b & 0xFFFF, b >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _M32


def rand16(index: Tensor, seed: int) -> Tensor:
    """16 random bits per element from a counter-based hash of (element index, seed); int64."""
    x = (_mul32(index & _M32, 0x9E3779B1) + seed) & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x >> 16


def fp32_to_bf16(x: Tensor, stochastic: bool = False, seed: int = 0) -> Tensor:
    """Round flat fp32 ``x`` to bf16: nearest-even, or stochastic (``(bits + rand16) >> 16``).

    NaN becomes 0x7FC0. Same bits as the CPU kernel.
    """
    bits = x.contiguous().view(torch.int32).long() & _M32
    if stochastic:
        r = rand16(torch.arange(x.numel(), device=x.device), seed)
    else:
        r = 0x7FFF + ((bits >> 16) & 1)
    out = ((bits + r) >> 16) & 0xFFFF
    out = torch.where(torch.isnan(x), 0x7FC0, out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded fp32 square root (torch.sqrt on fp32 CPU is not always; via float64 it is)."""
    return torch.sqrt(x.double()).float()


def adam_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, maximize: bool, coupled: bool):
    """The fp32 update, one op at a time (no fused multiply-add). ``h``: fp32 ``[9]`` hyper row.

    Returns ``(p, m, v)`` new fp32 tensors.
    """
    b1, omb1, b2, omb2, eps, step_size, inv_bc2_sqrt, decay, wd = h.unbind()
    if maximize:
        g = -g
    if coupled:
        g = g + wd * p
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * (g * g)
    p = p * decay
    denom = _sqrt(v) * inv_bc2_sqrt + eps
    # no update where v == 0: exact AdamW has m == 0 there too; quantized states can flush a tiny v to 0
    # while m survives, and m / eps would blow up (e.g. embedding rows absent from the batch)
    u = torch.where(v == 0, 0.0, m / denom)
    p = p - step_size * u
    return p, m, v


def torch_step(
    p: Tensor,
    g: Tensor,
    state: dict,
    fmt: StateFormat | None,
    block_size: int,
    h: Tensor,
    maximize: bool,
    coupled: bool,
    stochastic: bool,
    seed: int,
) -> None:
    """One Adam step of parameter ``p`` (in place) and its ``state``; ``fmt=None`` is fp32 state."""
    n = p.numel()
    p32 = p.detach().reshape(-1).float()
    g32 = g.reshape(-1).float()
    h = h.to(p.device)
    if fmt is None:
        m, v = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
    elif fmt.name == "fp8":
        m = blockwise.dequantize_fp8_blockwise(state["exp_avg_codes"], state["exp_avg_scale"], block_size, n)
        v = blockwise.dequantize_fp8_blockwise(
            state[f"{fmt.v_key}_codes"], state[f"{fmt.v_key}_scale"], block_size, n
        )
    else:
        m = blockwise.dequantize_blockwise(
            state["exp_avg_codes"], state["exp_avg_scale"], fmt.m_codebook, block_size, n
        )
        if fmt.v_rank1:
            v = blockwise.dequantize_rank1(
                state["exp_avg_sq_codes"], state["exp_avg_sq_row"], state["exp_avg_sq_col"], fmt.v_codebook
            )
        else:
            v = blockwise.dequantize_blockwise(
                state["exp_avg_sq_codes"], state["exp_avg_sq_scale"], fmt.v_codebook, block_size, n
            )
    if fmt is not None and fmt.v_sqrt:
        v = v * v
    p32, m, v = adam_math(p32, g32, m, v, h, maximize, coupled)

    if p.dtype == torch.bfloat16:
        p.copy_(fp32_to_bf16(p32, stochastic, seed).view(p.shape))
    else:
        p.copy_(p32.view(p.shape))

    if fmt is None:
        state["exp_avg"].view(-1).copy_(m)
        state["exp_avg_sq"].view(-1).copy_(v)
        return
    if fmt.v_sqrt:
        v = _sqrt(v)
    if fmt.v_rank1:
        codes, row, col = blockwise.quantize_rank1(v.view(p.shape[0], p.shape[1]), fmt.v_codebook)
        state["exp_avg_sq_codes"].copy_(codes)
        state["exp_avg_sq_row"].copy_(row)
        state["exp_avg_sq_col"].copy_(col)
    for key, x, book in (("exp_avg", m, fmt.m_codebook), (fmt.v_key, v, fmt.v_codebook)):
        if fmt.v_rank1 and key == fmt.v_key:
            continue
        if fmt.name == "fp8":
            codes, scale = blockwise.quantize_fp8_blockwise(x, block_size)
        else:
            codes, scale = blockwise.quantize_blockwise(x, book, block_size)
        state[f"{key}_codes"].copy_(codes)
        state[f"{key}_scale"].copy_(scale)
