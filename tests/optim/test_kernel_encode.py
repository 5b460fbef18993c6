"""The CPU kernel's arithmetic encode (no table gather) equals the exact cell-table encode.

8-bit dynamic maps: decade search + linear formula + an unsure band re-encoded with the table;
4-bit maps: a permute binary search over the thresholds. Checked densely around every threshold
(where codes change), on a strided sweep of all finite fp32 values, exhaustively (slow marker),
and through the optimizer step (arithmetic vs table encode give the same states).
"""

import numpy as np
import pytest
import torch

from lowbit import optim as lo
from lowbit.quant import blockwise

from . import kernel_testing

BOOKS = ["dynamic8_signed", "dynamic8_unsigned", "dynamic4_signed", "linear4_unsigned"]
ONE = 0x3F800000  # bits of 1.0
FINITE = 0x7F800000


def _check(kernel, name, lo_, hi, qmap=None, no_fallback=False):
    n, first = kernel_testing.encode_check(name, lo_, hi, qmap, no_fallback)
    assert n >= 0, f"{name}: no arithmetic encode"
    return n, first


@pytest.mark.parametrize("name", BOOKS)
def test_encode_around_thresholds(kernel, name):
    t = blockwise.thresholds(name).numpy().astype(np.float32)
    bits = np.unique(np.abs(t).view(np.uint32))
    w = 1 << 13  # +-8192 ulps around each threshold, both signs
    for b in bits.tolist():
        n, first = _check(kernel, name, max(0, b - w), min(FINITE, b + w))
        assert n == 0, f"{name}: {n} mismatches near threshold bits {b:#x}, first {first:#x}"


@pytest.mark.parametrize("name", BOOKS)
def test_encode_strided_sweep(kernel, name):
    # the range the kernel encodes (|x| <= ~1), in 64 windows of 64K patterns, then up to inf
    for b in np.linspace(0, ONE + 64, 64).astype(np.int64).tolist() + [
        0x40000000,
        0x5F000000,
        FINITE - 65536,
    ]:
        n, first = _check(kernel, name, b, min(FINITE, b + 65536))
        assert n == 0, f"{name}: {n} mismatches in window {b:#x}, first {first:#x}"


@pytest.mark.slow
@pytest.mark.parametrize("name", BOOKS)
def test_encode_exhaustive(kernel, name):
    """Every finite fp32 of magnitude < 2 (the kernel's inputs are <= 1 + 1 ulp), both signs."""
    n, first = _check(kernel, name, 0, 0x40000000)
    assert n == 0, f"{name}: {n} mismatches, first {first:#x}"


@pytest.mark.parametrize("name,code", [("dynamic4_signed", 10), ("linear4_unsigned", 5)])
def test_encode_check_can_fail(kernel, name, code):
    """4-bit: a map nudged by two ulps at one code must disagree with the table of the true map."""
    q = blockwise.codebook(name).clone()
    q[code] = torch.nextafter(torch.nextafter(q[code], torch.tensor(2.0)), torch.tensor(2.0))
    t = blockwise.thresholds(name)
    b = int(t[code - 1 : code + 1].abs().numpy().view(np.uint32).min())
    n, _ = _check(kernel, name, b - 4096, b + 4096, qmap=q)
    assert n > 0


@pytest.mark.parametrize("name", ["dynamic8_signed", "dynamic8_unsigned"])
def test_encode_check_can_fail_8bit(kernel, name):
    """8-bit: without the table re-encode of the unsure band the linear formula alone is wrong
    right at the thresholds (exact ties and their neighbours), and the check sees it."""
    t = blockwise.thresholds(name).numpy().astype(np.float32)
    total = 0
    for b in np.unique(np.abs(t).view(np.uint32)).tolist():
        n, _ = _check(kernel, name, b - 64, b + 64, no_fallback=True)
        total += n
    assert total > 0


@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit, lo.Adam8bit, lo.AdamWFp8])
@pytest.mark.parametrize("mode", ["table", "all_unsure"])
def test_step_arith_vs_table_encode(kernel, monkeypatch, cls, mode):
    """The step with the arithmetic encode equals the step with the table encode ("table"), and
    the step where every 8-bit lane goes through the table re-encode paths ("all_unsure")."""
    g = torch.Generator().manual_seed(0)
    scales = [1.0, 1e-3, 30.0]
    outs = []
    for alt in (False, True):
        if alt:
            kernel_testing.use_variant(
                monkeypatch, table_encode=mode == "table", all_unsure=mode == "all_unsure"
            )
        sizes = [4099, 4096, 3000]  # a partial last block, whole blocks (pipelined path only), both
        ps = [
            torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(k)) * s)
            for k, (n, s) in enumerate(zip(sizes, scales))
        ]
        opt = cls(ps, lr=1e-2, weight_decay=0.1, min_quant_size=16)
        for step in range(4):
            g.manual_seed(step)
            for p, s in zip(ps, scales):
                gr = torch.randn(p.shape, generator=g) * s
                gr[::7] = 0.0
                p.grad = gr
            opt.step()
        outs.append(
            ([p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps])
        )
    (pa, sa), (pb, sb) = outs
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    for a, b in zip(sa, sb):
        for k in a:
            assert torch.equal(a[k], b[k]), k
