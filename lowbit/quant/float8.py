"""float8 casts and the scaled GEMM: pure functions used by ``lowbit.float8`` (no nn.Module).

Conventions (docs/design.md, "Numerics contracts"):

* ``scale`` multiplies a high-precision tensor into the float8 range: ``x_fp8 = sat(x * scale)``,
  ``x ~= x_fp8 / scale``. It is ``fp8_max / clamp(amax, 1e-12)``, computed in float64 and rounded once
  to float32 (so eager and ``torch.compile`` agree bit for bit).
* Rowwise recipes round the scale *down* to a power of two: multiplying by it is exact, and a value is
  cast to the same float8 number whichever GEMM it feeds.
* Casts saturate: values beyond ``fp8_max`` clamp to ``+-fp8_max`` (PyTorch's plain cast would give NaN
  for e4m3fn and inf for e5m2).
* ``torch._scaled_mm`` takes *inverse* scales (the factor that maps float8 back to high precision).

Shapes: tensorwise scales are 0-d; rowwise scales keep the reduced dim (``(M, 1)`` for a per-row scale of
an ``(M, K)`` tensor, ``(1, N)`` for a per-column one), so ``x * scale`` broadcasts.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
EPS = 1e-12  # amax floor: an all-zero tensor gets a large finite scale instead of inf


def _check_float8_dtype(float8_dtype: torch.dtype) -> None:
    if float8_dtype not in FLOAT8_DTYPES:
        raise ValueError(f"float8_dtype must be one of {FLOAT8_DTYPES}, got {float8_dtype}")


@torch.no_grad()
def tensor_amax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``max(|x|)`` over the whole tensor (``dim=None``, 0-d result) or along ``dim`` (kept, size 1).

    Returned in ``x.dtype``; the max of representable values is exact in any dtype.
    """
    if dim is None:
        return torch.max(torch.abs(x))
    return torch.amax(torch.abs(x), dim=dim, keepdim=True)


@torch.no_grad()
def amax_to_scale(amax: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False) -> torch.Tensor:
    """float32 scale ``fp8_max / clamp(amax, 1e-12)``, the division done in float64.

    With ``power_of_2`` the scale is rounded down to the nearest power of two (``2**floor(log2(s))``,
    exactly), so scaling never rounds and the scaled amax stays <= fp8_max. (torchao 0.14.1 computes
    ``exp2(floor(log2(s)))`` in float32 and so rounds *up* when ``s`` is within a few ulp below a power
    of two; the two agree everywhere else.)
    """
    _check_float8_dtype(float8_dtype)
    scale = torch.finfo(float8_dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)
    scale = scale.to(torch.float32)
    if power_of_2:
        pow2 = torch.exp2(torch.floor(torch.log2(scale)))
        # float32 log2 rounds up to k for scales a few ulp below 2**k; step those back down (NaN stays NaN)
        scale = torch.where(pow2 > scale, pow2 * 0.5, pow2)
    return scale


@torch.no_grad()
def to_float8_saturated(x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x.float() * scale, -fp8_max, fp8_max)`` cast to ``float8_dtype`` (round to nearest even).

    ``x`` is upcast to float32 first, so bf16 and fp32 inputs go through the same float32 multiply.
    The result keeps ``x``'s shape and memory layout.
    """
    _check_float8_dtype(float8_dtype)
    fp8_max = torch.finfo(float8_dtype).max
    return (x.to(torch.float32) * scale).clamp(min=-fp8_max, max=fp8_max).to(float8_dtype)


@torch.no_grad()
def cast_to_float8(
    x: torch.Tensor, float8_dtype: torch.dtype, *, dim: int | None = None, power_of_2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamically scale ``x`` and cast it to float8: returns ``(data, scale)``.

    ``dim=None`` gives one tensorwise scale (0-d); ``dim=d`` reduces the amax along ``d`` (one scale per
    slice orthogonal to ``d``, shape of ``x`` with ``d`` set to 1). ``data`` has ``x``'s shape in
    ``float8_dtype``; ``x ~= data.float() / scale``.
    """
    scale = amax_to_scale(tensor_amax(x, dim), float8_dtype, power_of_2)
    return to_float8_saturated(x, scale, float8_dtype), scale


def dequantize_float8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 value of a float8 tensor: ``data.float() / scale``."""
    return data.to(torch.float32) / scale


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) >= t.size(1)


def _is_rowwise(a_scale: torch.Tensor, b_scale: torch.Tensor, m: int, n: int) -> bool:
    return tuple(a_scale.shape) == (m, 1) and tuple(b_scale.shape) == (1, n)


def float8_mm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    use_fast_accum: bool = False,
    emulate: bool = False,
) -> torch.Tensor:
    """``(a_data / a_scale) @ (b_data / b_scale)`` for float8 ``a`` (M, K) and ``b`` (K, N); (M, N) out.

    Scales are either 0-d (tensorwise) or ``a_scale`` (M, 1) with ``b_scale`` (1, N) (rowwise); a 0-d
    scale paired with a rowwise one is broadcast to a row/column vector (the rowwise kernel needs both).

    ``emulate=True`` dequantizes to float32 and runs a float32 ``torch.mm`` (any device), then casts to
    ``out_dtype``. Otherwise ``torch._scaled_mm`` runs with inverse scales, ``a`` row-major and ``b``
    column-major, shaped by what the CUDA kernels accept:

    * rowwise scales write bfloat16 (the rowwise kernel has no float32/float16 output), then the result
      is cast to ``out_dtype``;
    * rowwise without fast accumulation runs the tensorwise kernel with unit scales and applies
      ``1/a_scale * 1/b_scale`` to the (bfloat16) result afterwards, since the rowwise kernel is slow
      without fast accumulation.

    These choices follow torchao 0.14.1's float8 training GEMM so that the two agree bit for bit on CPU,
    where ``torch._scaled_mm`` dequantizes and runs a float32 GEMM (correct, not fast).
    """
    m, n = a_data.shape[0], b_data.shape[1]
    if a_data.shape[1] != b_data.shape[0]:
        raise ValueError(
            f"float8_mm: inner dims differ, a is {tuple(a_data.shape)}, b is {tuple(b_data.shape)}"
        )
    if emulate:
        return torch.mm(dequantize_float8(a_data, a_scale), dequantize_float8(b_data, b_scale)).to(out_dtype)

    if not _is_row_major(a_data):
        a_data = a_data.contiguous()
    if _is_row_major(b_data):
        b_data = b_data.t().contiguous().t()
    if a_scale.dim() == 0 and b_scale.dim() == 2:
        a_scale = a_scale.repeat(m).reshape(-1, 1)
    elif a_scale.dim() == 2 and b_scale.dim() == 0:
        b_scale = b_scale.repeat(n).reshape(1, -1)

    a_inv, b_inv = a_scale.reciprocal(), b_scale.reciprocal()
    rowwise = _is_rowwise(a_scale, b_scale, m, n)
    post_scale = None
    if rowwise and not use_fast_accum:
        post_scale = a_inv * b_inv  # (M, N) float32
        a_inv = b_inv = a_inv.new_ones(())
    mm_dtype = torch.bfloat16 if rowwise and out_dtype in (torch.float32, torch.float16) else out_dtype
    out = torch._scaled_mm(
        a_data, b_data, scale_a=a_inv, scale_b=b_inv, out_dtype=mm_dtype, use_fast_accum=use_fast_accum
    )
    if post_scale is not None:
        out = out.mul_(post_scale)
    return out.to(out_dtype)


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB, computed in float64."""
    ref, x = ref.detach().double(), x.detach().double()
    noise = torch.linalg.vector_norm(ref - x)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref) / noise))
