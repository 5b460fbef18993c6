"""lowbit.quant.gptq against an unblocked float64 OBQ recurrence and round-to-nearest."""

import pytest
import torch

from lowbit.quant import affine as A
from lowbit.quant.gptq import gptq, inverse_hessian_factor

QMIN, QMAX = A.INT4


def _qparams(wg):
    return (A.symmetric_scale(wg, QMIN, QMAX, group_size=None)[:, 0],)


def _fq(col, s):
    return A.fake_quantize(col[:, None], s[:, None], None, QMIN, QMAX, group_size=None)[:, 0]


def _reference(w, h, g, damp=0.01):
    """The GPTQ recurrence one column at a time (no lazy blocks), float64, written out plainly."""
    w = w.double().clone()
    u = inverse_hessian_factor(h, damp)
    n, k = w.shape
    latent, scales = torch.empty_like(w), []
    for i in range(k):
        if i % g == 0:
            scales.append(_qparams(w[:, i:i + g].float())[0])
        latent[:, i] = w[:, i]
        q = _fq(w[:, i].float(), scales[-1]).double()
        e = (w[:, i] - q) / u[i, i]
        w[:, i:] -= e[:, None] * u[i, i:][None, :]
    return latent.float(), torch.stack(scales, -1)


def _data(n=24, k=128, t=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)  # correlated inputs
    x = torch.randn(t, k, generator=g) @ mix
    return torch.randn(n, k, generator=g) * 0.05, x


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_gptq_equals_the_unblocked_recurrence(block_size):
    w, x = _data()
    h = x.t() @ x
    latent, (scale,) = gptq(w, h, 32, _qparams, _fq, block_size=block_size)
    ref_latent, ref_scale = _reference(w, h, 32)
    assert torch.allclose(scale, ref_scale, rtol=1e-6)
    assert torch.allclose(latent, ref_latent, atol=1e-6)
    # the latent weight rounds to the GPTQ codes on its own scales: fake quant of it is the answer
    q = A.fake_quantize(latent, scale, None, QMIN, QMAX, group_size=32)
    q_ref = A.fake_quantize(ref_latent, ref_scale, None, QMIN, QMAX, group_size=32)
    assert (q != q_ref).float().mean() < 1e-3


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w, _ = _data()
    latent, (scale,) = gptq(w, torch.eye(128) * 7.0, 32, _qparams, _fq)
    assert torch.equal(latent, w)
    assert torch.equal(scale, A.symmetric_scale(w, QMIN, QMAX, group_size=32))


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    w, x = _data(seed=1)
    latent, (scale,) = gptq(w, x.t() @ x, 32, _qparams, _fq)
    q_gptq = A.fake_quantize(latent, scale, None, QMIN, QMAX, group_size=32)
    s_rtn = A.symmetric_scale(w, QMIN, QMAX, group_size=32)
    q_rtn = A.fake_quantize(w, s_rtn, None, QMIN, QMAX, group_size=32)
    err = ((x @ (q_gptq - w).t()) ** 2).sum()
    err_rtn = ((x @ (q_rtn - w).t()) ** 2).sum()
    assert err < 0.8 * err_rtn


def test_gptq_bad_input():
    w, x = _data()
    with pytest.raises(ValueError, match="in_features 128 is not divisible by group_size 48"):
        gptq(w, x.t() @ x, 48, _qparams, _fq)
    with pytest.raises(ValueError, match=r"hessian shape \(64, 64\) does not match in_features 128"):
        gptq(w, torch.eye(64), 32, _qparams, _fq)
