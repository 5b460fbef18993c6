"""Codebooks, exact nearest-code encode, blockwise quantize/dequantize, fp8 blocks."""

import numpy as np
import pytest
import torch

from lowbit.quant import blockwise as B
from tests.optim.reference import nearest_codes

NAMES = list(B.CODEBOOKS)


@pytest.fixture(scope="module")
def torchao_maps():
    from torchao.optim.quant_utils import create_dynamic_map

    return {
        "dynamic8_signed": create_dynamic_map(True, 7, 8),
        "dynamic8_unsigned": create_dynamic_map(False, 7, 8),
        "dynamic4_signed": create_dynamic_map(True, 3, 4),
        "linear4_unsigned": [k / 16 for k in range(1, 17)],
    }


def _probe(name, n=2000, seed=0):
    """Values in [-1, 1] over the whole dynamic range, plus every map value, threshold and neighbour."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(-torch.rand(n, generator=g) * 18)  # 1 .. 1.5e-8
    x = mag * torch.randn(n, generator=g).sign()
    q, t = B.codebook(name), B.thresholds(name)
    below = torch.nextafter(t, torch.tensor(-2.0))
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 2.0**-24, -(2.0**-24)])
    return torch.cat([x, q, -q, t, -t, below, -below, edges]).float()


@pytest.mark.parametrize("name", NAMES)
def test_codebooks_equal_torchao_maps(name, torchao_maps):
    q = B.codebook(name)
    assert q.dtype == torch.float32 and q.numel() == 2 ** B.codebook_bits(name)
    assert torch.equal(q, torch.tensor(torchao_maps[name], dtype=torch.float32))
    assert torch.all(q[1:] > q[:-1])


def test_dynamic_map_structure():
    # signed 8-bit: 0, 1, and 127 values on each side; 10^-k decades with doubling resolution
    q = B.codebook("dynamic8_signed")
    pos = q[q > 0]
    assert (q == 0).sum() == 1 and pos.numel() == 128 and (q < 0).sum() == 127
    for k, count in zip(range(7), [64, 32, 16, 8, 4, 2, 1]):
        lo, hi = 10.0 ** -(k + 1), 10.0**-k
        assert ((pos >= lo) & (pos < hi)).sum() == count
    assert B.codebook("linear4_unsigned").min() == 1 / 16  # zero-free second moment


@pytest.mark.parametrize("name", NAMES)
def test_nearest_code_is_exact_nearest(name):
    x = _probe(name)
    want = nearest_codes(x.numpy(), B.codebook(name).numpy())
    got = B.nearest_code(x, name).long().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_cell_table_encode_equals_nearest(name):
    table, meta = B.encode_cell_table(name)
    x = torch.cat(
        [_probe(name, seed=1), torch.rand(20000) * 2 - 1, torch.tensor([float("nan"), float("inf")])]
    )
    want = B.nearest_code(torch.where(torch.isfinite(x), x, 0.0), name).long()
    assert torch.equal(B.encode_with_cell_table(x, table, meta), want)


@pytest.mark.parametrize("name", NAMES)
def test_nearest_code_agrees_with_torchao_quantize(name):
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1 << 14, generator=g) * torch.rand(1 << 14, generator=g) ** 4).clamp(-1, 1)
    if "unsigned" in name:
        x = x.abs()
    fn = quantize_8bit_with_qmap if B.codebook_bits(name) == 8 else quantize_4bit_with_qmap
    assert torch.equal(B.nearest_code(x, name), fn(x, B.codebook(name)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 128, 1000, 4097])
def test_quantize_blockwise_roundtrip(name, n):
    bs = 128
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 2, n)
    if "unsigned" in name:
        x = x.abs()
    codes, scale = B.quantize_blockwise(x, name, bs)
    nb = -(-n // bs)
    assert scale.shape == (nb,) and scale.dtype == torch.float32 and codes.dtype == torch.uint8
    assert codes.numel() == (n if B.codebook_bits(name) == 8 else -(-n // 2))
    # scale is the block absmax (the last block may be partial)
    for b in range(nb):
        assert scale[b] == x[b * bs:(b + 1) * bs].abs().max()
    y = B.dequantize_blockwise(codes, scale, name, bs, n)
    q = B.codebook(name).double()
    half_gap = (q[1:] - q[:-1]).max().item() / 2
    half_gap = max(half_gap, q[q >= 0].min().item())  # zero-free map: values near 0 go to its smallest
    err = (y.double() - x.double()).abs() / torch.repeat_interleave(scale, bs)[:n].double()
    assert err.max() <= half_gap + 1e-6
    # re-quantizing the dequantized values: a block whose absmax element is positive (every block of an
    # unsigned map) decodes that element to 1.0 * scale, so its scale comes back unchanged and so do its
    # codes (map values are fixed points). (A negative absmax element of a signed map decodes to
    # q.min() * scale, |q.min()| < 1: that block may get another scale.)
    c2, s2 = B.quantize_blockwise(y, name, bs)
    per_byte = 1 if B.codebook_bits(name) == 8 else 2
    kept = 0
    for b in range(nb):
        blk = x[b * bs:(b + 1) * bs]
        if blk[blk.abs().argmax()] > 0:
            assert s2[b] == scale[b]
            span = slice(b * bs // per_byte, min((b + 1) * bs, n + n % per_byte) // per_byte)
            assert torch.equal(c2[span], codes[span])
            kept += 1
    assert kept >= nb // 3  # the check ran on a good share of the blocks


def test_non_finite_values_stay_in_their_element():
    x = torch.linspace(-1, 1, 512)
    x[10], x[300] = float("nan"), float("inf")
    codes, scale = B.quantize_blockwise(x, "dynamic8_signed", 256)
    assert torch.isfinite(scale).all()
    finite = x.clone()
    finite[10] = finite[300] = 0.0
    c_ref, s_ref = B.quantize_blockwise(finite, "dynamic8_signed", 256)
    assert torch.equal(codes, c_ref) and torch.equal(scale, s_ref)


def test_zero_block_scale_is_floor_and_decodes_to_zero():
    codes, scale = B.quantize_blockwise(torch.zeros(300), "dynamic8_unsigned", 256)
    assert torch.all(scale == torch.tensor(B.SCALE_FLOOR, dtype=torch.float32))
    assert torch.all(B.dequantize_blockwise(codes, scale, "dynamic8_unsigned", 256, 300) == 0)


@pytest.mark.parametrize("n", [1, 2, 9, 100])
def test_pack_unpack_nibbles(n):
    c = torch.randint(0, 16, (n,), dtype=torch.uint8)
    p = B.pack_nibbles(c)
    assert p.numel() == -(-n // 2) and torch.equal(B.unpack_nibbles(p, n), c)
    assert int(p[0]) == int(c[0]) | (int(c[1]) << 4 if n > 1 else 0)


@pytest.mark.parametrize("n", [5, 256, 1000])
def test_fp8_blockwise(n):
    bs = 256
    x = torch.randn(n) * torch.logspace(-4, 1, n)
    x[0] = 1e-12  # deep subnormal after scaling
    codes, scale = B.quantize_fp8_blockwise(x, bs)
    assert codes.dtype == torch.float8_e4m3fn and not torch.isnan(codes.float()).any()
    for b in range(scale.numel()):
        blk = x[b * bs:(b + 1) * bs]
        assert scale[b] == blk.abs().max() / 448
        # the absmax element maps to +-448 (the e4m3fn max), nothing saturates beyond
        assert codes[b * bs:(b + 1) * bs].float().abs().max() == 448
    y = B.dequantize_fp8_blockwise(codes, scale, bs, n)
    rel = ((y - x).abs() / torch.repeat_interleave(scale, bs)[:n])
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 of the value, absolute <= 2^-10 in subnormals
    assert torch.all(rel <= (x.abs() / torch.repeat_interleave(scale, bs)[:n]) * 2**-4 + 2**-10)
