"""The fast step (fused C++ kernel, its scalar path, the pure-torch step) equals the slow
reference step bit for bit: parameters and every state tensor, over several steps."""

import pytest
import torch

from lowbit import optim as lo
from lowbit.optim import _cpu_kernel
from lowbit.optim import adam as adam_mod

from . import kernel_testing
from .reference import bits_equal, reference_step

CLASSES = {
    ("8bit", True): lo.AdamW8bit,
    ("4bit", True): lo.AdamW4bit,
    ("fp8", True): lo.AdamWFp8,
    ("8bit", False): lo.Adam8bit,
    ("4bit", False): lo.Adam4bit,
    ("fp8", False): lo.AdamFp8,
}
# sizes around block multiples, odd sizes, multi-dim; (257,) stays fp32 (min_quant_size=300)
SHAPES = [(4096,), (4097,), (64, 65), (3, 100, 7), (257,), (1003,)]
SEEDS = [1234 + 7 * j for j in range(16)]


def _make_params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.02, 3.0, 1e-3, 1.0, 0.5]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * sc).to(dtype)) for s, sc in zip(SHAPES, scales)]


def _grads(params, step, seed, nonfinite=False):
    g = torch.Generator().manual_seed(seed * 100 + step)
    out = []
    for k, p in enumerate(params):
        x = torch.randn(p.shape, generator=g) * [1e-3, 1.0, 1e-6, 10.0, 1e-2, 0.3][k]
        x[x.abs() < 0.05 * x.abs().max()] = 0.0  # exact zeros too
        if nonfinite and step == 1:  # NaN / inf elements in some blocks of some parameters
            x.view(-1)[[5, 300 % x.numel()]] = float("nan")
            x.view(-1)[-1] = float("inf") if k % 2 else -float("inf")
        out.append(x.to(p.dtype))
    return out


def _run(
    impl,
    fmt,
    decoupled,
    dtype,
    block_size,
    stochastic,
    maximize,
    books,
    monkeypatch,
    steps=3,
    seed=0,
    nonfinite=False,
):
    """Train the SHAPES parameters with backend ``impl`` and compare every step with the reference."""
    if impl == "torch":
        monkeypatch.setenv("LOWBIT_OPTIM_BACKEND", "torch")
    elif impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("LOWBIT_OPTIM_BACKEND", "triton")
    elif _cpu_kernel.get() is None:
        pytest.skip("CPU kernel unavailable")
    else:
        monkeypatch.setenv("LOWBIT_OPTIM_BACKEND", "cpp")
    if impl == "kernel_scalar":
        kernel_testing.use_variant(monkeypatch, scalar_only=True)
    monkeypatch.setattr(adam_mod, "_sr_seeds", lambda n: SEEDS[:n])
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    params = _make_params(dtype, seed)
    ref_p = [p.detach().clone() for p in params]
    opt = CLASSES[(fmt, decoupled)](
        params,
        **hp,
        maximize=maximize,
        block_size=block_size,
        min_quant_size=300,
        bf16_stochastic_round=stochastic,
    )
    ref_s = None
    for step in range(steps):
        grads = _grads(params, step, seed, nonfinite)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if ref_s is None:  # fresh state as the optimizer created it (all-zero moments)
            ref_s = [
                {
                    k: v.clone() if k.endswith("_codes") else torch.zeros_like(v)
                    for k, v in opt.state[p].items()
                }
                for p in params
            ]
            for s in ref_s:
                s["step"] = torch.tensor(0.0)
            _reset_codes(ref_s, fmt)
        j_q = j_f = 0
        for k, p in enumerate(params):
            quant = p.numel() >= 300
            sd = SEEDS[j_q] if quant else SEEDS[j_f]
            j_q, j_f = (j_q + 1, j_f) if quant else (j_q, j_f + 1)
            ref_p[k], ref_s[k] = reference_step(
                ref_p[k],
                grads[k],
                ref_s[k],
                fmt,
                block_size,
                **hp,
                decoupled=decoupled,
                maximize=maximize,
                stochastic=stochastic,
                seed=sd,
                books=books,
            )
            assert bits_equal(p.data, ref_p[k]), f"{impl}: param {k} shape {SHAPES[k]} differs at step {step}"
            for key, v in ref_s[k].items():
                assert bits_equal(opt.state[p][key], v), (
                    f"{impl}: state {key} of param {k} differs, step {step}"
                )


def _reset_codes(states, fmt):
    # the zero moment's codes: the map index of 0 (dynamic maps), code 0 (linear map / fp8)
    from lowbit.quant import blockwise

    zero = {"8bit": (127, 0), "4bit": (7 | 7 << 4, 0), "fp8": (0, 0)}[fmt]
    assert blockwise.codebook("dynamic8_signed")[127] == 0 and blockwise.codebook("dynamic4_signed")[7] == 0
    for s in states:
        if "exp_avg_codes" in s:
            s["exp_avg_codes"] = torch.full_like(s["exp_avg_codes"].view(torch.uint8), zero[0]).view(
                s["exp_avg_codes"].dtype
            )
            vkey = "exp_avg_sqrt_codes" if fmt == "fp8" else "exp_avg_sq_codes"
            s[vkey] = torch.full_like(s[vkey].view(torch.uint8), zero[1]).view(s[vkey].dtype)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("impl", ["kernel", "kernel_scalar", "torch"])
def test_fp32_params_match_reference(fmt, decoupled, impl, books, monkeypatch):
    _run(
        impl,
        fmt,
        decoupled,
        torch.float32,
        {"8bit": 256, "4bit": 128, "fp8": 256}[fmt],
        False,
        False,
        books,
        monkeypatch,
    )


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_bf16_params_odd_block_size_match_reference(fmt, impl, books, monkeypatch):
    _run(impl, fmt, True, torch.bfloat16, 200, False, True, books, monkeypatch, steps=2, seed=1)


@pytest.mark.parametrize("impl", ["kernel", "kernel_scalar", "torch"])
def test_bf16_stochastic_rounding_matches_reference(impl, books, monkeypatch):
    _run(impl, "8bit", True, torch.bfloat16, 64, True, False, books, monkeypatch, steps=2, seed=2)


def test_stochastic_rounding_is_unbiased(kernel):
    # every element's fp32 update lands 30% of the way from one bf16 value to the next
    lo_, hi_ = 1.0, 1.0 + 2**-7  # adjacent bf16 values
    target = lo_ + 0.3 * 2**-7
    n = 20000
    p = torch.nn.Parameter(torch.full((n,), hi_, dtype=torch.bfloat16))
    # zero gradient: the update is p * (1 - lr * wd) = target (up to fp32 rounding)
    lr = 1.0
    opt = lo.AdamW8bit([p], lr=lr, weight_decay=1.0 - target / hi_, bf16_stochastic_round=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    vals = p.data.float()
    assert torch.all((vals == lo_) | (vals == hi_))
    up = (vals == hi_).float().mean().item()
    assert abs(up - 0.3) < 0.015, up
    # with round-to-nearest every element would go down
    q = torch.nn.Parameter(torch.full((n,), hi_, dtype=torch.bfloat16))
    q.grad = torch.zeros_like(q)
    lo.AdamW8bit([q], lr=lr, weight_decay=1.0 - target / hi_).step()
    assert torch.all(q.data.float() == lo_)
