"""Affine integer quantization: qparams, quantize, dequantize, fake-quant with a straight-through estimator.

Pure functions, no nn.Module. Every granularity is "groups along the last dim":

- per-token activations ``x[..., K]``: ``group_size=None`` (one scale per row/token),
- per-channel weights ``w[N, K]``: ``group_size=None`` (one scale per output channel),
- per-group weights ``w[N, K]``: ``group_size=g`` (``K // g`` scales per output channel).

Scales / zero points have shape ``x.shape[:-1] + (n_groups,)``.

The arithmetic (operation order, dtypes, eps, rounding) reproduces what torchao 0.14.1 computes on
CPU when it quantizes for inference, so that a fake-quantized forward can equal the converted
model's forward bit for bit:

- integer zero-point domain (``torchao.quantization.quant_primitives``):
  ``q = clamp(round(x * (1.0 / scale)) + zero_point, qmin, qmax)``,
  ``x_hat = (q - zero_point) * scale``; scales are computed in ``x.dtype``;
  ``eps`` defaults to ``torch.finfo(x.dtype).eps`` (note: bf16 eps = 2**-7 for bf16 activations);
- tinygemm float zero-point domain (``Int4WeightOnlyConfig`` CPU kernel):
  ``scale = (max - min) / 15`` clamped to 1e-6, ``zero = min + 8 * scale``,
  ``q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)``, ``w_hat = (q - 8) * scale + zero``
  (the kernel dequantizes in fp32).

Rounding is ``torch.round`` (half to even). Fake quant's gradient is the straight-through estimator:
identity through rounding, zero where the rounded value was clipped to ``[qmin, qmax]``; qparams are
computed under ``no_grad``.
"""

from __future__ import annotations

import torch

# (qmin, qmax) per quantized integer type
INT4 = (-8, 7)
UINT4 = (0, 15)
INT8 = (-128, 127)
INT8_REDUCED = (-127, 127)


def group_view(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``x[..., K]`` as ``x[..., K // g, g]`` (``g = K`` when ``group_size`` is None)."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(f"last dim {k} is not divisible by group_size {group_size}")
    return x.view(*x.shape[:-1], k // g, g)


def _expand(p: torch.Tensor) -> torch.Tensor:
    """qparam ``[..., n_groups]`` -> ``[..., n_groups, 1]`` to broadcast over a group view."""
    return p.unsqueeze(-1)


@torch.no_grad()
def symmetric_scale(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
    eps: float | None = None,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Symmetric scale ``max(|x|) / ((qmax - qmin) / 2)`` per group, clamped to ``eps``.

    Args:
        x: float tensor ``[..., K]`` (fp32 / bf16 / fp16).
        qmin, qmax: integer range, e.g. ``INT4`` -> scale = amax / 7.5, ``INT8_REDUCED`` -> amax / 127.
        group_size: group along the last dim, None for one group per row.
        eps: minimum scale, default ``torch.finfo(x.dtype).eps``.
        scale_dtype: dtype of the returned scale, default ``x.dtype``.

    Returns:
        scale ``[..., K // g]`` of ``scale_dtype``. The symmetric zero point is 0.
    """
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xg = group_view(x, group_size)
    min_neg = torch.min(xg.amin(-1), torch.zeros((), dtype=x.dtype, device=x.device))
    max_pos = torch.max(xg.amax(-1), torch.zeros((), dtype=x.dtype, device=x.device))
    max_pos = torch.max(-min_neg, max_pos)
    scale = max_pos / (float(qmax - qmin) / 2)
    scale = torch.clamp(scale, min=eps)
    return scale.to(scale_dtype or x.dtype)


@torch.no_grad()
def asymmetric_qparams(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
    eps: float | None = None,
    zero_point_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max, zero preserved) scale and integer zero point per group.

    ``scale = (max(x, 0) - min(x, 0)) / (qmax - qmin)`` clamped to ``eps`` (default
    ``finfo(x.dtype).eps``), ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.

    Returns:
        ``(scale [..., n_groups] in x.dtype, zero_point [..., n_groups] of zero_point_dtype)``.
    """
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xg = group_view(x, group_size)
    min_neg = torch.min(xg.amin(-1), torch.zeros((), dtype=x.dtype, device=x.device))
    max_pos = torch.max(xg.amax(-1), torch.zeros((), dtype=x.dtype, device=x.device))
    scale = (max_pos - min_neg) / float(qmax - qmin)
    scale = torch.clamp(scale, min=eps)
    zero_point = qmin - torch.round(min_neg / scale)
    zero_point = torch.clamp(zero_point, qmin, qmax)
    return scale, zero_point.to(zero_point_dtype)


@torch.no_grad()
def tinygemm_qparams(
    w: torch.Tensor, group_size: int, *, qmin: int = 0, qmax: int = 15, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uint4 qparams with a float zero (tinygemm / ``_weight_int4pack_mm_for_cpu``).

    Returns:
        ``(scale, zero)`` both ``[N, K // group_size]`` in ``w.dtype``; ``zero`` is the float value
        that dequantizes the mid code ``(qmin + qmax + 1) / 2``.
    """
    wg = group_view(w, group_size)
    min_val = wg.amin(-1)
    max_val = wg.amax(-1)
    scale = (max_val - min_val) / float(qmax - qmin)
    scale = torch.clamp(scale, min=eps)
    mid = (qmax + qmin + 1) / 2
    zero = min_val + scale * mid
    return scale, zero.to(w.dtype)


# Candidate shrink factors of the min / max range for the MSE range search (1.0 = min / max itself).
MSE_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))  # 1.00, 0.98, ..., 0.50


@torch.no_grad()
def mse_symmetric_scale(
    x: torch.Tensor, qmin: int, qmax: int, *, group_size: int | None, ratios=MSE_RATIOS
) -> torch.Tensor:
    """Per group, the scale ``r * symmetric_scale(x)`` (``r`` in ``ratios``) whose fake quant of ``x``
    has the least squared error: min / max clipped to where rounding error and clipping error balance.

    Args:
        x: float weight ``[..., K]``; the error is measured in fp32.
        qmin, qmax, group_size: as :func:`symmetric_scale`.
        ratios: candidate shrink factors; the first one wins ties, so keep ``1.0`` first to prefer
            the min / max scale.

    Returns:
        scale ``[..., K // g]`` in ``x.dtype``, never smaller than ``torch.finfo(x.dtype).eps``.
    """
    base = symmetric_scale(x, qmin, qmax, group_size=group_size)
    eps = torch.finfo(x.dtype).eps
    best = best_err = None
    for r in ratios:
        scale = torch.clamp(base * r, min=eps)
        err = _group_sq_error(x, fake_quantize(x, scale, None, qmin, qmax, group_size=group_size), group_size)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def mse_tinygemm_qparams(
    w: torch.Tensor, group_size: int, *, qmin: int = 0, qmax: int = 15, ratios=MSE_RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tinygemm_qparams` with each group's ``[min, max]`` shrunk about its centre by the factor
    in ``ratios`` whose fake quant of ``w`` has the least squared error (first ratio wins ties).

    Returns:
        ``(scale, zero)`` both ``[N, K // group_size]`` in ``w.dtype``.
    """
    scale0, zero0 = tinygemm_qparams(w, group_size, qmin=qmin, qmax=qmax)
    # zero dequantizes code ``mid``, half a step above the range's centre: keeping the centre while the
    # step shrinks to ``r * scale0`` moves it by ``(1 - r) * scale0 / 2`` (exactly zero0 at r = 1).
    offset = (qmax + qmin + 1) / 2 - (qmax - qmin) / 2
    best = best_err = None
    for r in ratios:
        scale = torch.clamp(scale0 * r, min=1e-6)
        zero = (zero0 - scale0 * ((1.0 - r) * offset)).to(w.dtype)
        q = quantize_tinygemm(w, scale, zero, group_size, qmin=qmin, qmax=qmax)
        err = _group_sq_error(w, dequantize_tinygemm(q, scale, zero, group_size, qmin=qmin, qmax=qmax),
                              group_size)
        if best is None:
            best, best_err = (scale, zero), err
        else:
            better = err < best_err
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
            best_err = torch.where(better, err, best_err)
    return best


def _group_sq_error(x: torch.Tensor, x_hat: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``sum((x_hat - x)^2)`` per group, in fp32: ``[..., K // g]``."""
    return (group_view(x_hat.float() - x.float(), group_size) ** 2).sum(-1)


def _round_add(u: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``round(u) + zero_point`` (the integer code before clamping); no zero point: ``round(u)``."""
    r = torch.round(u)
    return r if zero_point is None else r + zero_point


def _in_range_mask(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 where the integer code ``r`` equals its clamped value ``q``, 0 where it was clipped, as float16.

    Computed with float arithmetic, not comparisons: ``r - q`` is 0 in range and an integer of magnitude
    >= 1 outside. Inductor's CPU code for a fused kernel that also stores a comparison mask (bool or
    uint8) took ~2.4x the time of the same kernel without it (2048x384 activation fake quant: 2.4 ms vs
    1.0 ms); this form costs ~0.1 ms. float16 holds 0 and 1 exactly in 2 bytes.
    """
    return (1.0 - torch.clamp((r - q).abs(), max=1.0)).to(torch.float16)


class _RoundAddClampSTE(torch.autograd.Function):
    """``clamp(round(u) + zero_point, qmin, qmax)``; gradient: identity, zero where clipped."""

    @staticmethod
    def forward(ctx, u, zero_point, qmin, qmax):
        r = _round_add(u, zero_point)
        q = torch.clamp(r, qmin, qmax)
        ctx.save_for_backward(_in_range_mask(r, q))
        return q

    @staticmethod
    def backward(ctx, grad):
        (in_range,) = ctx.saved_tensors
        return grad * in_range.to(grad.dtype), None, None, None


def round_clamp(
    u: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, *, ste: bool = False
) -> torch.Tensor:
    """``clamp(round(u) + zero_point, qmin, qmax)`` in ``u``'s dtype (integer-valued float).

    With ``ste=True`` the gradient w.r.t. ``u`` is passed through unchanged where the value was not
    clipped and is zero where it was (straight-through estimator).
    """
    if ste and u.requires_grad:
        return _RoundAddClampSTE.apply(u, zero_point, qmin, qmax)
    return torch.clamp(_round_add(u, zero_point), qmin, qmax)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
    ste: bool = False,
) -> torch.Tensor:
    """Integer-domain affine quantization ``clamp(round(x * (1.0 / scale)) + zero_point, qmin, qmax)``.

    Args:
        x: ``[..., K]`` float. scale / zero_point: ``[..., K // g]`` (zero_point None = symmetric,
            no zero point added, as torchao's ZeroPointDomain.NONE).
        ste: straight-through gradient (see :func:`round_clamp`).

    Returns:
        integer-valued tensor ``[..., K]`` in the promoted float dtype of ``x`` and ``scale``
        (cast with ``.to(torch.int8)`` for storage).
    """
    u, zp = _to_grid(x, scale, zero_point, group_size)
    return round_clamp(u, zp, qmin, qmax, ste=ste).view(x.shape)


def _to_grid(x, scale, zero_point, group_size):
    """``(x * (1.0 / scale), zero_point)`` in the grouped view ``[..., K // g, g]`` (the qparams expanded)."""
    zp = None if zero_point is None else _expand(zero_point)
    return group_view(x, group_size) * (1.0 / _expand(scale)), zp


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(q.to(dtype) - zero_point.to(dtype)) * scale``, returned in ``dtype`` (default ``scale.dtype``)."""
    dtype = dtype or scale.dtype
    qg = group_view(q.to(dtype), group_size)
    if zero_point is not None:
        qg = qg - _expand(zero_point).to(dtype)
    return (qg * _expand(scale)).view(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x.dtype`` with the straight-through estimator gradient.

    Gradient w.r.t. ``x``: passed through unchanged where ``round(x / scale) + zero_point`` lies in
    ``[qmin, qmax]``, zero where it was clipped; none w.r.t. the qparams (computed under no_grad).
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, group_size)
    q = quantize(x, scale, zero_point, qmin, qmax, group_size=group_size)
    return dequantize(q, scale, zero_point, group_size=group_size, dtype=x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """:func:`fake_quantize` as one autograd node: the forward's values are exactly the plain path's,
    the backward is one ``grad * in_range`` (the chain rule through ``* (1 / scale)``, the rounding STE
    and ``* scale`` would add two multiplies and save three tensors per call; compiled QAT steps paid
    ~25% for that on the tiny model)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, group_size):
        r = _round_add(*_to_grid(x, scale, zero_point, group_size))
        q = torch.clamp(r, qmin, qmax)
        ctx.save_for_backward(_in_range_mask(r, q).view(x.shape))
        return dequantize(q.view(x.shape), scale, zero_point, group_size=group_size, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (in_range,) = ctx.saved_tensors
        return grad * in_range.to(grad.dtype), None, None, None, None, None


def quantize_tinygemm(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    *,
    qmin: int = 0,
    qmax: int = 15,
    ste: bool = False,
) -> torch.Tensor:
    """Float-zero-domain quantization ``clamp(round((w - (zero - scale * mid)) / scale), qmin, qmax)``."""
    wg = group_view(w, group_size)
    s = _expand(scale)
    min_val = _expand(zero) - s * ((qmax + qmin + 1) / 2)
    q = round_clamp((wg - min_val) / s, None, qmin, qmax, ste=ste)
    return q.view(w.shape)


def dequantize_tinygemm(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    *,
    qmin: int = 0,
    qmax: int = 15,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - mid) * scale + zero`` computed in ``dtype`` (fp32 is what the CPU int4 kernel uses)."""
    qg = group_view(q.to(dtype), group_size) - (qmax + qmin + 1) / 2
    return (qg * _expand(scale).to(dtype) + _expand(zero).to(dtype)).view(q.shape)


def fake_quantize_tinygemm(w: torch.Tensor, group_size: int, *, dtype: torch.dtype = torch.float32):
    """uint4 tinygemm fake quant of ``w[N, K]``: qparams, quantize (STE), dequantize in ``dtype``."""
    scale, zero = tinygemm_qparams(w.detach(), group_size)
    q = quantize_tinygemm(w, scale, zero, group_size, ste=True)
    return dequantize_tinygemm(q, scale, zero, group_size, dtype=dtype)


@torch.no_grad()
def quant_dequant_int8_per_token_asym(x: torch.Tensor) -> torch.Tensor:
    """Inference-time int8 asymmetric per-token quant-dequant of activations ``x`` ``[..., K]``.

    The same numbers as ``fake_quantize(x, *asymmetric_qparams(x, -128, 127), -128, 127)`` (torchao's
    ``_apply_int8_act_asym_per_token_quant_dequant``), in the same operation order, but with one
    ``aminmax`` and in-place ops: in eager decode (one token, ~10 small kernels per linear) the op count
    is the cost. No autograd. Returns a new tensor of ``x``'s shape and dtype.
    """
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    scale = (hi - lo).div_(255.0).clamp_(min=torch.finfo(x.dtype).eps)
    zero_point = torch.round(lo / scale).neg_().add_(-128).clamp_(-128, 127)
    q = (x * (1.0 / scale)).round_().add_(zero_point).clamp_(-128, 127)
    return q.sub_(zero_point).mul_(scale)


# ----------------------------------------------------------------------------- learned qparams (LSQ)
class _FakeQuantLSQ(torch.autograd.Function):
    """:func:`fake_quantize` with a trainable scale: the forward is the same expression (same values),
    the backward is LSQ's (Esser et al., 2020).

    With ``u = x / s`` and ``q = clamp(round(u) + zp)``: ``dx = grad`` where in range, 0 where clipped;
    ``ds = sum over the group of grad * ((q - zp) - u * in_range)`` (``round(u) - u`` in range,
    ``q - zp`` where clipped).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, group_size):
        u, zp = _to_grid(x, scale, zero_point, group_size)
        r = _round_add(u, zp)
        q = torch.clamp(r, qmin, qmax)
        in_range = _in_range_mask(r, q)
        ctx.save_for_backward(u, q, in_range, zero_point)
        ctx.group_size = group_size
        return dequantize(q.view(x.shape), scale, zero_point, group_size=group_size, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        u, q, in_range, zero_point = ctx.saved_tensors
        m = in_range.to(grad.dtype)
        g = group_view(grad, ctx.group_size)
        qz = q if zero_point is None else q - _expand(zero_point).to(q.dtype)
        grad_scale = (g * (qz - u * m)).sum(-1)
        return (g * m).view(grad.shape), grad_scale, None, None, None, None


def fake_quantize_learned(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` whose ``scale`` (``[..., K // g]``, a trainable tensor) gets LSQ gradients.

    The values are exactly :func:`fake_quantize`'s for the same ``scale`` (so the converted model with
    these qparams reproduces them bit for bit); the integer ``zero_point`` is not trained.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuantLSQ.apply(x, scale, zero_point, qmin, qmax, group_size)
    return fake_quantize(x, scale, zero_point, qmin, qmax, group_size=group_size)  # no gradient needed


class _FakeQuantTinygemmLSQ(torch.autograd.Function):
    """:func:`fake_quantize_tinygemm` with trainable ``scale`` and float ``zero``; LSQ+ gradients.

    With ``u = (w - (zero - mid * s)) / s`` and ``q = clamp(round(u))``, ``w_hat = (q - mid) * s + zero``:
    ``dw = grad`` in range; ``ds = grad * ((q - mid) - (u - mid) * in_range)``;
    ``dzero = grad * (1 - in_range)`` (a shift of the zero moves only the clipped values).
    """

    @staticmethod
    def forward(ctx, w, scale, zero, group_size, qmin, qmax, dtype):
        wg = group_view(w, group_size)
        s = _expand(scale)
        mid = (qmax + qmin + 1) / 2
        u = (wg - (_expand(zero) - s * mid)) / s
        r = torch.round(u)
        q = torch.clamp(r, qmin, qmax)
        in_range = _in_range_mask(r, q)
        ctx.save_for_backward(u, q, in_range)
        ctx.meta = (group_size, mid, w.shape, w.dtype)
        return dequantize_tinygemm(q.view(w.shape), scale, zero, group_size, qmin=qmin, qmax=qmax,
                                   dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        u, q, in_range = ctx.saved_tensors
        group_size, mid, shape, wdtype = ctx.meta
        g = group_view(grad.float(), group_size)
        m = in_range.to(g.dtype)
        grad_scale = (g * ((q - mid) - (u - mid) * m)).sum(-1)
        grad_zero = (g * (1 - m)).sum(-1)
        return (g * m).view(shape).to(wdtype), grad_scale, grad_zero, None, None, None, None


def fake_quantize_tinygemm_learned(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                                   *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint4 tinygemm fake quant of ``w[N, K]`` with given (trainable) ``scale`` / ``zero``
    ``[N, K // group_size]``; values equal :func:`dequantize_tinygemm` of :func:`quantize_tinygemm`."""
    if torch.is_grad_enabled() and (w.requires_grad or scale.requires_grad or zero.requires_grad):
        return _FakeQuantTinygemmLSQ.apply(w, scale, zero, group_size, 0, 15, dtype)
    q = quantize_tinygemm(w, scale, zero, group_size)
    return dequantize_tinygemm(q, scale, zero, group_size, dtype=dtype)
