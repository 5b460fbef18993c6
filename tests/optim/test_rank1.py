"""4-bit state with rank-1 normalized second moments (``v_norm="rank1"``): bit-exact against the slow
reference on every backend that runs it, fallback to blockwise where it does not apply, state dicts."""

import io

import pytest
import torch

from lowbit import optim as lo
from lowbit.optim import backend

from .reference import bits_equal, reference_step

SHAPES = [(64, 67), (33, 128), (5, 1000), (257,)]  # 2-D quantized (odd sizes), 1-D stays fp32


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter((torch.randn(s, generator=g) * sc).to(dtype))
        for s, sc in zip(SHAPES, [1.0, 0.02, 3.0, 0.5])
    ]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for k, p in enumerate(params):
        x = torch.randn(p.shape, generator=g) * [1e-3, 1.0, 10.0, 0.3][k]
        x[x.abs() < 0.05 * x.abs().max()] = 0.0
        x[(torch.rand(p.shape, generator=g) < 0.2) & (torch.arange(p.shape[-1]) < 7)] *= 1e-4  # small columns
        if step == 1 and k == 1:
            x[3, 5], x[7, 0] = float("nan"), float("inf")
        out.append(x.to(p.dtype))
    return out


@pytest.mark.parametrize("impl", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("dtype,coupled", [(torch.float32, False), (torch.bfloat16, True)])
def test_rank1_matches_reference(impl, dtype, coupled, books, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv(backend.ENV, impl)
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    params = _params(dtype)
    cls = lo.Adam4bit if coupled else lo.AdamW4bit
    opt = cls(params, **hp, min_quant_size=300, v_norm="rank1")
    ref_p = [p.detach().clone() for p in params]
    ref_s = None
    for step in range(3):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if ref_s is None:
            ref_s = [
                {
                    k: (v.clone() if k.endswith("_codes") else torch.zeros_like(v))
                    for k, v in opt.state[p].items()
                }
                for p in params
            ]
            for s_ in ref_s:
                s_["step"] = torch.tensor(0.0)
                for k in ("exp_avg_codes", "exp_avg_sq_codes"):
                    if (
                        k in s_
                    ):  # fresh codes: dynamic map's 0 (index 7) for m, code 0 of the linear map for v
                        s_[k] = torch.full_like(s_[k], 7 | 7 << 4 if k == "exp_avg_codes" else 0)
        for k, p in enumerate(params):
            ref_p[k], ref_s[k] = reference_step(
                ref_p[k],
                grads[k],
                ref_s[k],
                "4bit",
                128,
                **hp,
                decoupled=not coupled,
                maximize=False,
                books=books,
            )
            assert bits_equal(p.data, ref_p[k]), f"param {SHAPES[k]} step {step}"
            assert set(opt.state[p]) == set(ref_s[k])
            for key, v in ref_s[k].items():
                assert bits_equal(opt.state[p][key], v), f"{key} of {SHAPES[k]} step {step}"
    assert "exp_avg_sq_row" in opt.state[params[0]] and opt.state[params[0]]["exp_avg_sq_col"].shape == (67,)


def test_rank1_state_is_smaller_and_falls_back_naming_the_parameter():
    w = torch.nn.Parameter(torch.randn(256, 512))
    conv = torch.nn.Parameter(torch.randn(16, 16, 3, 3, 3))  # 3-D+: blockwise, said once
    with pytest.warns(
        UserWarning, match=r"v_norm='rank1' does not apply to parameter 'conv'.*5-D.*blockwise"
    ):
        opt = lo.AdamW4bit([("w", w), ("conv", conv)], lr=1e-3, v_norm="rank1")
        for _ in range(2):
            w.grad, conv.grad = torch.randn_like(w), torch.randn_like(conv)
            opt.step()
    assert set(opt.state[conv]) == {
        "step",
        "exp_avg_codes",
        "exp_avg_scale",
        "exp_avg_sq_codes",
        "exp_avg_sq_scale",
    }
    st = opt.state[w]
    assert st["exp_avg_sq_row"].shape == (256,) and st["exp_avg_sq_col"].shape == (512,)
    blockwise = 2 * (256 * 512 // 128)  # bytes saved: v's block scales replaced by row + column scales
    assert (
        sum(t.numel() * t.element_size() for t in st.values())
        == 256 * 512 + 4 * (blockwise // 2 + 256 + 512) + 4
    )
    with pytest.raises(ValueError, match="4-bit optimizers only"):
        lo.AdamW8bit([w], v_norm="rank1")
    with pytest.raises(ValueError, match="v_norm must be"):
        lo.AdamW4bit([w], v_norm="rowwise")


def test_rank1_state_dict_resumes_and_other_layout_fails_naming_keys():
    def run(opt, params, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 100)), torch.nn.Parameter(torch.randn(100))]
    opt = lo.AdamW4bit([("w", ps[0]), ("b", ps[1])], lr=1e-2, min_quant_size=1000, v_norm="rank1")
    run(opt, ps, 2, 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in ps]
    run(opt, ps, 2, 2)

    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    qs = [torch.nn.Parameter(t.clone()) for t in saved]
    opt2 = lo.AdamW4bit([("w", qs[0]), ("b", qs[1])], lr=1e-2, min_quant_size=1000, v_norm="rank1")
    opt2.load_state_dict(sd)
    run(opt2, qs, 2, 2)
    for a, b in zip(ps, qs):
        assert bits_equal(a, b)

    blockwise = lo.AdamW4bit([("w", qs[0]), ("b", qs[1])], lr=1e-2, min_quant_size=1000)
    with pytest.raises(
        ValueError, match=r"parameter 'w'.*4bit \(block_size.*exp_avg_sq_scale.*exp_avg_sq_col"
    ):
        blockwise.load_state_dict(sd)
    blockwise_sd = blockwise.state_dict()
    run(blockwise, qs, 1, 3)
    with pytest.raises(ValueError, match=r"parameter 'w'.*rank-1 v_norm.*exp_avg_sq_row.*exp_avg_sq_scale"):
        opt2.load_state_dict(blockwise.state_dict())
    assert blockwise_sd["param_groups"][0]["v_norm"] == "blockwise"
