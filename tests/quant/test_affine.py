"""lowbit.quant.affine against torchao's quant primitives (exact) and float64 brute-force references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchao.quantization.quant_primitives import (
    MappingType,
    _choose_qparams_affine_tinygemm,
    _quantize_affine_no_zero_point,
    _quantize_affine_tinygemm,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

from lowbit.quant import affine as A

DTYPES = [torch.float32, torch.bfloat16]


def _x(shape, dtype, small, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    return (x * (0.002 if small else 1.0)).to(dtype)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 7),
    n_groups=st.integers(1, 4),
    gsize=st.sampled_from([4, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    small=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_symmetric_int4_per_group_matches_torchao(rows, n_groups, gsize, dtype, small, seed):
    w = _x((rows, n_groups * gsize), dtype, small, seed)
    scale = A.symmetric_scale(w, *A.INT4, group_size=gsize)
    ref_s, ref_zp = choose_qparams_affine(w, MappingType.SYMMETRIC, (1, gsize), torch.int8, -8, 7,
                                          zero_point_dtype=torch.int8)
    assert scale.dtype == ref_s.dtype == dtype
    assert torch.equal(scale, ref_s.view_as(scale))
    zp = torch.zeros_like(scale, dtype=torch.int8)
    q = A.quantize(w, scale, zp, *A.INT4, group_size=gsize)
    ref_q = quantize_affine(w, (1, gsize), ref_s, ref_zp, torch.int8, -8, 7)
    assert torch.equal(q.to(torch.int8), ref_q)
    dq = A.dequantize(q, scale, zp, group_size=gsize, dtype=dtype)
    ref_dq = dequantize_affine(ref_q, (1, gsize), ref_s, ref_zp, torch.int8, -8, 7, output_dtype=dtype)
    assert torch.equal(dq, ref_dq)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(1, 8), (3, 5, 24), (2, 1, 3, 40)]),
    dtype=st.sampled_from(DTYPES),
    small=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_asymmetric_int8_per_token_matches_torchao(shape, dtype, small, seed):
    x = _x(shape, dtype, small, seed)
    scale, zp = A.asymmetric_qparams(x, *A.INT8)
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    ref_s, ref_zp = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                          zero_point_dtype=torch.int8)
    assert torch.equal(scale, ref_s.view_as(scale)) and torch.equal(zp, ref_zp.view_as(zp))
    q = A.quantize(x, scale, zp, *A.INT8)
    ref_q = quantize_affine(x, block, ref_s, ref_zp, torch.int8, -128, 127)
    assert torch.equal(q.to(torch.int8), ref_q)
    dq = A.dequantize(q, scale, zp, dtype=dtype)
    ref = dequantize_affine(ref_q, block, ref_s, ref_zp, torch.int8, -128, 127, output_dtype=dtype)
    assert torch.equal(dq, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_int8_per_channel_no_zero_point_matches_torchao(dtype):
    w = _x((6, 40), dtype, False, 0)
    eps = torch.finfo(torch.float32).eps
    scale = A.symmetric_scale(w, *A.INT8, eps=eps)
    ref_s, _ = choose_qparams_affine(w, MappingType.SYMMETRIC, (1, 40), torch.int8, eps=eps)
    assert torch.equal(scale.squeeze(-1), ref_s)
    q = A.quantize(w, scale, None, *A.INT8)
    ref_q = _quantize_affine_no_zero_point(w, (1, 40), ref_s, None, torch.int8, -128, 127)
    assert torch.equal(q.to(torch.int8), ref_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [False, True])
def test_tinygemm_matches_torchao(dtype, small):
    w = _x((8, 96), dtype, small, 3)
    s, z = A.tinygemm_qparams(w, 32)
    ref_s, ref_z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, (1, 32), torch.int32, 0, 15,
                                                   1e-6, None, w.dtype)
    assert torch.equal(s, ref_s.view_as(s)) and torch.equal(z, ref_z.view_as(z))
    q = A.quantize_tinygemm(w, s, z, 32)
    ref_q = _quantize_affine_tinygemm(w, (1, 32), ref_s, ref_z, torch.int32, 0, 15)
    assert torch.equal(q.to(torch.int32), ref_q)


def test_against_float64_reference():
    """Independent brute-force reference: per-row loops in float64."""
    w = _x((5, 64), torch.float32, False, 7)
    scale = A.symmetric_scale(w, *A.INT4, group_size=16)
    q = A.quantize(w, scale, None, *A.INT4, group_size=16)
    for r in range(5):
        for gi in range(4):
            blk = w[r, gi * 16:(gi + 1) * 16].double()
            s = blk.abs().max().item() / 7.5
            assert abs(scale[r, gi].item() - s) <= 1e-6 * s
            ref = [min(7, max(-8, round(v / s))) for v in blk.tolist()]
            got = q[r, gi * 16:(gi + 1) * 16].tolist()
            # x*(1/s) vs x/s may flip an exact .5 tie; anything else must agree
            assert sum(a != b for a, b in zip(got, ref, strict=True)) <= 1
    # asymmetric: zero is exactly representable and the range maps onto [qmin, qmax]
    x = _x((4, 33), torch.float32, False, 8)
    s, zp = A.asymmetric_qparams(x, *A.INT8)
    lo, hi = x.amin(-1).clamp(max=0).double(), x.amax(-1).clamp(min=0).double()
    torch.testing.assert_close(s.squeeze(-1).double(), (hi - lo) / 255, rtol=1e-6, atol=0)
    dq = A.dequantize(A.quantize(x, s, zp, *A.INT8), s, zp)
    assert (dq - x).abs().max() <= s.max() / 2 + 1e-7
    zero = torch.zeros(4, 33)
    assert torch.equal(A.dequantize(A.quantize(zero, s, zp, *A.INT8), s, zp), zero)


def test_fake_quant_ste_gradient_identity_and_zero_when_clipped():
    x = torch.tensor([[-1.0, -0.3, 0.0, 0.2, 0.5, 3.0]], requires_grad=True)
    scale = torch.tensor([[0.1]])  # int4: representable range [-0.8, 0.7]
    y = A.fake_quantize(x, scale, None, *A.INT4)
    torch.testing.assert_close(y.detach(), torch.tensor([[-0.8, -0.3, 0.0, 0.2, 0.5, 0.7]]))
    y.sum().backward()
    # identity (up to scale * (1/scale) rounding) where in range, exactly zero where clipped
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))
    assert x.grad[0, 0] == 0 and x.grad[0, -1] == 0


@pytest.mark.parametrize(
    "dtype,compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_ste_gradient_is_upstream_times_comparison_mask(dtype, compiled):
    """Both STE nodes (eager and compiled): grad == upstream where the pre-clamp code is in range, exactly
    0 where it is not, against a mask built with plain comparisons; int4 symmetric weights clip at +8.
    Compiled bf16 is left out: Inductor keeps bf16 intermediates in fp32 (no rounding of ``w * (1/s)``
    to bf16), so its codes, and not only its mask, can differ from eager by one step."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(16, 64, generator=g) * 0.02).to(dtype)
    w[0, :4] = torch.tensor(
        [1.0, -1.0, 0.5, -0.5], dtype=dtype
    )  # group amax elements: +amax clips (7.5 -> 8)
    upstream = torch.randn(16, 64, generator=g).to(dtype)
    scale = A.symmetric_scale(w, *A.INT4, group_size=32)
    zp = torch.zeros_like(scale, dtype=torch.int8)

    def fq(w):
        return A.fake_quantize(w, scale, zp, *A.INT4, group_size=32)

    def rc(w):
        return A.quantize(w, scale, None, *A.INT4, group_size=32, ste=True)

    r = torch.round(A.group_view(w, 32) * (1.0 / scale.unsqueeze(-1))).view(w.shape)
    in_range = (r >= -8) & (r <= 7)
    assert not in_range.all() and in_range.any()
    masked = torch.where(in_range, upstream, torch.zeros_like(upstream))
    # quantize returns codes: d code / d w = 1 / scale (the chain rule through ``* (1.0 / scale)``)
    masked_codes = (A.group_view(masked, 32) * (1.0 / scale.unsqueeze(-1))).view(w.shape)
    for f, expected in ((fq, masked), (rc, masked_codes)):
        f = torch.compile(f, fullgraph=True) if compiled else f
        leaf = w.clone().requires_grad_(True)
        f(leaf).backward(upstream)
        assert leaf.grad.dtype == dtype
        assert torch.equal(leaf.grad, expected)


def test_qparams_have_no_grad():
    w = torch.randn(4, 32, requires_grad=True)
    assert not A.symmetric_scale(w, *A.INT4, group_size=8).requires_grad
    s, zp = A.asymmetric_qparams(w, *A.INT8)
    assert not s.requires_grad and not zp.requires_grad


def test_bad_group_size():
    with pytest.raises(ValueError, match="not divisible by group_size 24"):
        A.symmetric_scale(torch.randn(2, 64), *A.INT4, group_size=24)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    k=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    spread=st.sampled_from([1.0, 0.002, 50.0]),
    shift=st.sampled_from([0.0, 3.0, -3.0]),
    seed=st.integers(0, 2**16),
)
def test_inference_int8_per_token_quant_dequant_equals_torchao(rows, k, dtype, spread, shift, seed):
    """The in-place inference path gives torchao's per-token activation numbers bit for bit (k >= 2:
    torchao's own function fails on k == 1)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    g = torch.Generator().manual_seed(seed)
    x = ((torch.randn(2, rows, k, generator=g) + shift) * spread).to(dtype)
    x[0, 0, : k // 2] = 0.0  # all-zero / one-signed rows exercise the zero clamps and eps
    got = A.quant_dequant_int8_per_token_asym(x)
    want = _apply_int8_act_asym_per_token_quant_dequant(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- learned qparams (LSQ)
def _lsq_reference(w, scale, qmin, qmax, g):
    """LSQ in float64 by autograd: ``clamp(u + (round(u) - u).detach()) * s``, ``u = w / s`` (per group)."""
    w64 = w.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    u = w64.view(*w.shape[:-1], -1, g) / s64.unsqueeze(-1)
    q = torch.clamp(u + (torch.round(u) - u).detach(), qmin, qmax)
    return w64, s64, (q * s64.unsqueeze(-1)).view(w.shape)


def test_fake_quantize_learned_values_and_lsq_gradients():
    from lowbit.quant.affine import fake_quantize, fake_quantize_learned, symmetric_scale

    torch.manual_seed(0)
    for qmin, qmax, g in ((-8, 7, 16), (-4, 3, 32), (-2, 1, 8)):
        w = torch.randn(6, 64, requires_grad=True)
        scale = symmetric_scale(w, qmin, qmax, group_size=g) * (torch.rand(6, 64 // g) + 0.5)
        scale.requires_grad_()
        y = fake_quantize_learned(w, scale, None, qmin, qmax, group_size=g)
        want = fake_quantize(w.detach(), scale.detach(), None, qmin, qmax, group_size=g)
        assert torch.equal(y.detach(), want)
        grad = torch.randn_like(y)
        y.backward(grad)
        w64, s64, y64 = _lsq_reference(w, scale, qmin, qmax, g)
        y64.backward(grad.double())
        assert torch.allclose(w.grad.double(), w64.grad, atol=1e-6)
        assert torch.allclose(scale.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)


def test_fake_quantize_tinygemm_learned_values_and_gradients():
    from lowbit.quant.affine import (
        dequantize_tinygemm,
        fake_quantize_tinygemm_learned,
        quantize_tinygemm,
        tinygemm_qparams,
    )

    torch.manual_seed(1)
    g = 32
    w = torch.randn(4, 64, requires_grad=True)
    scale, zero = tinygemm_qparams(w.detach(), g)
    scale = (scale * (torch.rand_like(scale) * 0.6 + 0.6)).requires_grad_()
    zero = (zero + 0.1 * scale.detach() * torch.randn_like(zero)).requires_grad_()
    y = fake_quantize_tinygemm_learned(w, scale, zero, g)
    q = quantize_tinygemm(w.detach(), scale.detach(), zero.detach(), g)
    assert torch.equal(y.detach(), dequantize_tinygemm(q, scale.detach(), zero.detach(), g))
    grad = torch.randn_like(y)
    y.backward(grad)
    # float64 autograd reference with a straight-through round
    w64, s64, z64 = (t.detach().double().requires_grad_() for t in (w, scale, zero))
    s, z = s64.unsqueeze(-1), z64.unsqueeze(-1)
    u = (w64.view(4, 2, g) - (z - 8 * s)) / s
    qq = torch.clamp(u + (torch.round(u) - u).detach(), 0, 15)
    ((qq - 8) * s + z).view(4, 64).backward(grad.double())
    assert torch.allclose(w.grad.double(), w64.grad, atol=1e-6)
    assert torch.allclose(scale.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(zero.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)


def _sym_error64(wg: torch.Tensor, scale: float, qmin: int, qmax: int) -> float:
    """float64 squared error of symmetric fake quant of one group at ``scale``."""
    w = wg.double()
    q = torch.clamp(torch.round(w / scale), qmin, qmax)
    return float(((q * scale - w) ** 2).sum())


@settings(max_examples=15, deadline=None)
@given(qrange=st.sampled_from([A.INT4, (-4, 3), (-2, 1)]), g=st.sampled_from([16, 32]),
       rows=st.integers(1, 6), seed=st.integers(0, 2**16), heavy=st.booleans())
def test_mse_symmetric_scale_is_the_best_candidate_per_group(qrange, g, rows, seed, heavy):
    torch.manual_seed(seed)
    w = torch.randn(rows, 2 * g)
    if heavy:  # an outlier per row: min / max wastes most of the grid, the search should shrink
        w[:, 0] *= 8
    qmin, qmax = qrange
    base = A.symmetric_scale(w, qmin, qmax, group_size=g)
    got = A.mse_symmetric_scale(w, qmin, qmax, group_size=g)
    assert got.shape == base.shape and got.dtype == w.dtype
    for r in range(rows):
        for j in range(2):
            wg = w[r, j * g:(j + 1) * g]
            cands = [float(base[r, j]) * ratio for ratio in A.MSE_RATIOS]
            errs = [_sym_error64(wg, s, qmin, qmax) for s in cands]
            err = _sym_error64(wg, float(got[r, j]), qmin, qmax)
            assert any(abs(float(got[r, j]) - s) <= 1e-7 * s for s in cands)
            assert err <= min(errs) * (1 + 1e-5) + 1e-12
            assert err <= errs[0] * (1 + 1e-5) + 1e-12  # never worse than min / max


def test_mse_qparams_with_only_ratio_one_are_the_min_max_qparams():
    w = torch.randn(8, 64)
    assert torch.equal(A.mse_symmetric_scale(w, -8, 7, group_size=32, ratios=(1.0,)),
                       A.symmetric_scale(w, -8, 7, group_size=32))
    s, z = A.mse_tinygemm_qparams(w, 32, ratios=(1.0,))
    s0, z0 = A.tinygemm_qparams(w, 32)
    assert torch.equal(s, s0) and torch.equal(z, z0)


def test_mse_tinygemm_qparams_keep_the_centre_and_minimise_the_error():
    torch.manual_seed(3)
    w = torch.randn(5, 64)
    w[:, 3] *= 6
    s0, z0 = A.tinygemm_qparams(w, 32)
    s, z = A.mse_tinygemm_qparams(w, 32)
    # the range [zero - 8 s, zero + 7 s] keeps the min / max range's centre
    assert torch.allclose(z - 0.5 * s, z0 - 0.5 * s0, atol=1e-6)
    assert (s < s0).any()

    def err64(scale, zero):
        q = A.quantize_tinygemm(w, scale, zero, 32)
        return ((A.dequantize_tinygemm(q, scale, zero, 32).double() - w.double()).view(5, 2, 32) ** 2).sum(-1)

    best = err64(s, z)
    assert (best <= err64(s0, z0) * (1 + 1e-6)).all()
    for ratio in A.MSE_RATIOS:
        sr = s0 * ratio
        assert (best <= err64(sr, (z0 - 0.5 * (s0 - sr))) * (1 + 1e-5) + 1e-12).all()
