"""lowbit.quant.float8 against independent references: Python float64 math and brute-force float8 tables."""

import math

import numpy as np
import pytest
import torch

from lowbit.quant.float8 import (
    E4M3,
    E5M2,
    amax_to_scale,
    cast_to_float8,
    dequantize_float8,
    float8_mm,
    sqnr,
    tensor_amax,
    to_float8_saturated,
)

FP8 = [E4M3, E5M2]


def _all_finite_values(dtype):
    """Every finite value of a float8 dtype with its bit pattern (brute-force table)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(dtype).to(torch.float64)
    keep = torch.isfinite(vals)
    return vals[keep].numpy(), codes[keep].to(torch.int64).numpy()


def _reference_cast(x: np.ndarray, dtype) -> np.ndarray:
    """Saturating round-to-nearest-even into ``dtype``, by search over all finite float8 values."""
    vals, codes = _all_finite_values(dtype)
    fmax = vals.max()
    out = np.empty_like(x)
    for i, v in enumerate(x):
        v = min(max(v, -fmax), fmax)
        dist = np.abs(vals - v)
        best = np.flatnonzero(dist == dist.min())
        # tie: the even mantissa (even code); +0/-0 tie is irrelevant (both are zero)
        even = [j for j in best if codes[j] % 2 == 0]
        out[i] = vals[(even or list(best))[0]]
    return out


@pytest.mark.parametrize("dtype", FP8)
def test_amax_to_scale_is_float64_division_rounded_once(dtype):
    fmax = torch.finfo(dtype).max
    amax = torch.cat(
        [torch.rand(200) * 10.0 ** torch.randint(-8, 8, (200,)), torch.tensor([0.0, 1e-30, 3.0e38])]
    )
    got = amax_to_scale(amax, dtype)
    assert got.dtype == torch.float32
    want = np.array([np.float32(fmax / max(float(a), 1e-12)) for a in amax.tolist()], dtype=np.float32)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("dtype", FP8)
def test_power_of_2_scale_is_largest_power_of_two_not_above(dtype):
    fmax = torch.finfo(dtype).max
    # random amaxes plus amaxes whose scale lands 1-2 float32 ulp below a power of two
    pows = torch.tensor([2.0**k for k in range(-10, 30)], dtype=torch.float32)
    below = torch.nextafter(pows, torch.zeros_like(pows))
    edge = (fmax / below.double()).float()
    amax = torch.cat([torch.rand(300) * 1e3, edge])
    scale = amax_to_scale(amax, dtype, power_of_2=False)
    got = amax_to_scale(amax, dtype, power_of_2=True)
    want = [2.0 ** (math.frexp(s)[1] - 1) for s in scale.tolist()]
    assert got.tolist() == want
    assert bool((got <= scale).all()) and bool((got > scale / 2).all())


def test_torchao_power_of_2_rounding_differs_only_just_below_powers_of_two():
    """Documents lowbit's one deliberate deviation from torchao 0.14.1 (see amax_to_scale)."""
    from torchao.float8.float8_utils import _round_scale_down_to_power_of_2

    pows = torch.tensor([2.0**k for k in range(-10, 30)], dtype=torch.float32)
    below = torch.nextafter(pows, torch.zeros_like(pows))
    ours = amax_to_scale((448.0 / below.double()).float(), E4M3, power_of_2=True)
    theirs = _round_scale_down_to_power_of_2(amax_to_scale((448.0 / below.double()).float(), E4M3))
    assert bool((ours < below).all())
    assert bool((theirs > below).any())  # torchao rounds some of these up
    # on random amaxes (no scale within an ulp of a power of two, with overwhelming odds) they agree
    amax = torch.rand(100_000) * 100
    theirs = _round_scale_down_to_power_of_2(amax_to_scale(amax, E4M3))
    assert torch.equal(amax_to_scale(amax, E4M3, power_of_2=True), theirs)


@pytest.mark.parametrize("dtype", FP8)
def test_saturating_cast_matches_brute_force_round_to_nearest_even(dtype):
    vals, _ = _all_finite_values(dtype)
    pos = np.unique(vals[vals > 0])
    mids = (pos[:-1] + pos[1:]) / 2  # exact ties
    g = torch.Generator().manual_seed(0)
    rnd = (torch.randn(400, generator=g, dtype=torch.float64) * pos.max() / 4).numpy()
    x = np.concatenate([rnd, mids, -mids, [pos.max() * 1.5, -pos.max() * 1e3, 0.0]])
    x = np.float32(x).astype(np.float64)  # exactly representable in the float32 the cast works in
    got = to_float8_saturated(torch.from_numpy(x), torch.tensor(1.0), dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.to(torch.float64).numpy(), _reference_cast(x, dtype))


def test_cast_scales_per_tensor_and_per_row_and_column():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, generator=g) * torch.logspace(-3, 3, 8)[:, None]
    for dim, shape in [(None, ()), (-1, (8, 1)), (0, (1, 32))]:
        data, scale = cast_to_float8(x, E4M3, dim=dim, power_of_2=dim is not None)
        assert data.shape == x.shape and scale.shape == shape
        # the amax of each slice lands within one power of two below fp8_max (exactly at it for tensorwise)
        scaled_amax = tensor_amax(x.double() * scale.double(), dim)
        if dim is None:
            assert float(scaled_amax) == pytest.approx(448.0, rel=1e-6)
        else:
            assert bool((scaled_amax <= 448.0).all()) and bool((scaled_amax > 224.0).all())
        # per-slice relative error of the round trip is bounded by e4m3's half-ulp (2**-4)
        err = (dequantize_float8(data, scale) - x).abs()
        bound = tensor_amax(x, dim) * 2.0**-4 + 1e-30
        assert bool((err <= bound).all())


def test_cast_propagates_nan_instead_of_saturating():
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    data, _ = cast_to_float8(x, E4M3)
    assert bool(torch.isnan(data.float()).any())
    data, _ = cast_to_float8(x, E4M3, dim=-1, power_of_2=True)
    assert bool(torch.isnan(data[1].float()).all()) and not bool(torch.isnan(data[0].float()).any())


def test_bf16_and_fp32_inputs_cast_identically():
    x = torch.randn(16, 32).bfloat16()
    d1, s1 = cast_to_float8(x, E4M3, dim=-1, power_of_2=True)
    d2, s2 = cast_to_float8(x.float(), E4M3, dim=-1, power_of_2=True)
    assert torch.equal(s1, s2) and torch.equal(d1.view(torch.uint8), d2.view(torch.uint8))


def _operands(m=32, k=64, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * 4
    b = torch.randn(n, k, generator=g)
    return a, b


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_float8_mm_matches_float64_product_of_dequantized_operands(rowwise, emulate, out_dtype):
    a, b = _operands()
    a8, sa = cast_to_float8(a, E4M3, dim=-1 if rowwise else None, power_of_2=rowwise)
    b8, sb = cast_to_float8(b.t(), E4M3, dim=0 if rowwise else None, power_of_2=rowwise)
    ref = (a8.double() / sa.double()) @ (b8.double() / sb.double())
    for fast in (False, True):
        out = float8_mm(a8, sa, b8, sb, out_dtype, use_fast_accum=fast, emulate=emulate)
        assert out.dtype == out_dtype and out.shape == (32, 48)
        # float32 result: fp32 accumulation error only; bfloat16 (or rowwise, which goes through
        # bfloat16, see float8_mm): at most two bf16 roundings of the result
        lossy = out_dtype == torch.bfloat16 or (rowwise and not emulate)
        tol = 2 * 2.0**-8 if lossy else 1e-5
        assert bool(((out.double() - ref).abs() <= tol * ref.abs() + 1e-4).all())


def test_float8_mm_broadcasts_a_tensorwise_scale_against_a_rowwise_one():
    a, b = _operands(seed=3)
    a8, sa = cast_to_float8(a, E4M3, dim=-1, power_of_2=True)
    b8, sb = cast_to_float8(b.t(), E4M3, power_of_2=True)
    ref = (a8.double() / sa.double()) @ (b8.double() / sb.double())
    for emulate in (False, True):
        out = float8_mm(a8, sa, b8, sb, torch.float32, emulate=emulate)
        assert bool(((out.double() - ref).abs() <= 2 * 2.0**-8 * ref.abs() + 1e-4).all())


def test_float8_mm_rejects_mismatched_inner_dims():
    a8 = torch.zeros(4, 32).to(E4M3)
    b8 = torch.zeros(16, 8).to(E4M3)
    with pytest.raises(ValueError, match="inner dims"):
        float8_mm(a8, torch.tensor(1.0), b8, torch.tensor(1.0), torch.float32)


def test_unsupported_float8_dtype_is_named():
    with pytest.raises(ValueError, match="float8_dtype"):
        amax_to_scale(torch.tensor(1.0), torch.int8)


def test_sqnr():
    ref = torch.ones(100)
    assert sqnr(ref, ref * 1.1) == pytest.approx(20.0)
    assert sqnr(ref, ref) == float("inf")
