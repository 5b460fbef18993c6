"""quantize_for_inference: torchao configs per scheme, float64 references, dtype, errors, scoping."""

import copy

import pytest
import torch
from torch import nn

from lowbit.eval.quantize import Int8DynActInt4Linear, model_bytes, quantize_for_inference
from lowbit.models import build_model


def _lin(in_f=256, out_f=96, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f, bias=bias))


def _fq_act_asym_per_token(x):
    """Independent float64 int8 asymmetric per-token quant-dequant (torchao's 8da4w activation rule)."""
    x = x.double()
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zp).clamp(-128, 127)
    return (q - zp) * scale


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _tinygemm_dequant64(w, g):
    """Independent float64 uint4 asymmetric per-group (tinygemm) quant-dequant of ``w`` (N, K)."""
    wg = w.double().view(w.shape[0], -1, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + scale * 8
    q = torch.round((wg - lo) / scale).clamp(0, 15)
    bcast = lambda t: t.expand_as(wg).reshape(w.shape)  # noqa: E731
    return ((q - 8) * scale + zero).view_as(w), bcast(scale), bcast(zero)


@pytest.mark.parametrize("scheme", ["8w", "4w"])
def test_weight_only_fp32_within_half_step_of_float_weight(scheme):
    m = quantize_for_inference(_lin(), scheme, dtype=torch.float32)
    w0 = _lin()[0].weight.detach().double()
    if scheme == "8w":
        step = (w0.abs().amax(-1, keepdim=True) / 127.5).expand_as(w0)
        ref_w = torch.round(w0 / step).clamp(-128, 127) * step
    else:
        ref_w, step, _ = _tinygemm_dequant64(w0, 128)
    probe = m(torch.eye(256)).double().t()  # the weight the kernel multiplies with
    assert ((probe - w0).abs() <= 0.5 * step * (1 + 1e-4) + 1e-7).all()
    # same integer codes as the float64 reference except rare ties at x.5 (fp32 vs float64 division)
    diff = (probe - ref_w).abs()
    flipped = diff > 1e-6 * w0.abs().max()
    assert flipped.float().mean() < 2e-3
    assert torch.allclose(diff[flipped], step[flipped], rtol=1e-3)


def _assert_bf16_output(y, x, w, b):
    """``y`` (bf16) = ``x @ w.T + b`` computed in float64, within the usual bound of bf16 arithmetic for a
    dot product: 2^-8 (one bf16 ulp) times ``sum_k |x_k w_k| + |b|``, element by element (measured:
    up to 0.3 of it)."""
    assert y.dtype == torch.bfloat16
    err = (y.double() - (x.double() @ w.t() + b)).abs()
    assert (err <= 2**-8 * (x.double().abs() @ w.abs().t() + b.abs())).all()


def test_8w_bf16_codes_scales_and_output_match_an_independent_reference():
    """bf16 8w: torchao picks scale = bf16(amax / 127.5) and codes round(bf16(w * bf16(1 / scale))) in bf16
    arithmetic; the reference computes both from the bf16 weight, and the output in float64."""
    m = quantize_for_inference(_lin(bias=True), "8w")
    assert m[0].bias.dtype == torch.bfloat16  # the fast kernels' dtype is the default for these schemes
    w = _lin(bias=True)[0].weight.detach().bfloat16()
    scale = (w.double().abs().amax(-1, keepdim=True) / 127.5).bfloat16()
    codes = torch.round(w * (1.0 / scale.float()).bfloat16()).clamp(-128, 127)
    impl = m[0].weight.tensor_impl
    assert torch.equal(impl.scale, scale.squeeze(-1))
    assert torch.equal(impl.int_data, codes.to(torch.int8))
    ref_w = codes.double() * scale.double()
    x = torch.randn(5, 256).bfloat16()
    _assert_bf16_output(m(x), x, ref_w, m[0].bias.double())


def test_4w_bf16_output_matches_torchao_tinygemm_reference():
    """bf16 4w: the reference dequantizes with torchao's tinygemm primitives (the layout the kernel reads)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    m = quantize_for_inference(_lin(bias=True), "4w")
    assert m[0].bias.dtype == torch.bfloat16
    w0 = _lin(bias=True)[0].weight.detach().bfloat16()
    blk = [1, 128]
    s, z = _choose_qparams_affine_tinygemm(w0, MappingType.ASYMMETRIC, blk, torch.int32, 0, 15, 1e-6, None,
                                           torch.bfloat16)
    q = _quantize_affine_tinygemm(w0, blk, s, z, torch.int32, 0, 15)
    ref_w = _dequantize_affine_tinygemm(q, blk, s, z, torch.int32, 0, 15, output_dtype=torch.float32).double()
    x = torch.randn(5, 256).bfloat16()
    _assert_bf16_output(m(x), x, ref_w, m[0].bias.double())


def test_8da4w_fast_path_matches_torchao_and_float64():
    m = _lin(in_f=128, out_f=64)
    ref_mod = copy.deepcopy(m).bfloat16()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(
        ref_mod,
        Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
    )
    quantize_for_inference(m, "8da4w")
    assert isinstance(m[0], Int8DynActInt4Linear)
    tw = ref_mod[0].weight
    w64 = (
        tw.qdata.double() - tw.zero_point.double().repeat_interleave(32, -1)
    ) * tw.scale.double().repeat_interleave(32, -1)
    x = (torch.randn(7, 128) * torch.linspace(0.1, 4, 7)[:, None]).bfloat16()
    y = m(x)
    expect = _fq_act_asym_per_token(x.float()) @ w64.t()
    assert _rel(y, expect) < 1e-2
    assert _rel(y, ref_mod(x)) < 1e-2
    # eager fp32: the exact torchao path (no repack)
    m32 = quantize_for_inference(_lin(in_f=128, out_f=64), "8da4w", dtype=torch.float32)
    assert isinstance(m32[0], nn.Linear) and m32[0].weight.dtype == torch.float32
    assert (
        _rel(m32(x.float()), _fq_act_asym_per_token(x.float()) @ m32[0].weight.dequantize().double().t())
        < 1e-5
    )


def test_8da8w_matches_symmetric_per_token_reference():
    m = _lin()
    quantize_for_inference(m, "8da8w")
    assert m[0].weight.dtype == torch.float32  # keeps the model dtype
    # weights: int8 symmetric per channel, step amax / 127.5, from the float weights in float64
    w0 = _lin()[0].weight.detach().double()
    step = (w0.abs().amax(-1, keepdim=True) / 127.5).expand_as(w0)
    ref_w = torch.round(w0 / step).clamp(-128, 127) * step
    probe = m(torch.eye(256)).double().t()  # a one-hot row quantizes exactly: the weight the kernel uses
    diff = (probe - ref_w).abs()
    flipped = diff > 1e-6 * w0.abs().max()  # ties at x.5 (fp32 vs float64 division), one step away
    assert flipped.float().mean() < 2e-3 and torch.allclose(diff[flipped], step[flipped], rtol=1e-3)
    ref_w = torch.where(flipped, probe, ref_w)
    x = torch.randn(4, 256)
    xs = (x.double().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-5)  # reduced-range symmetric int8
    xq = torch.round(x.double() / xs).clamp(-127, 127) * xs
    err = (m(x).double() - xq @ ref_w.t()).abs()
    assert (err <= 1e-5 * (xq.abs() @ ref_w.abs().t())).all()


def test_layers_that_do_not_fit_stay_float_and_tied_head_untouched():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 32))  # 96 % 64 != 0: second layer stays float
    x = torch.randn(3, 128)
    ref1 = seq[1].weight.detach().clone()
    quantize_for_inference(seq, "8da4w", group_size=64)
    assert isinstance(seq[0], Int8DynActInt4Linear) and seq[0].group_size == 64
    assert isinstance(seq[1], nn.Linear) and type(seq[1].weight) is nn.Parameter
    assert torch.equal(seq[1].weight.float(), ref1.bfloat16().float())
    assert seq(x.bfloat16()).shape == (3, 32)
    model = quantize_for_inference(build_model("tiny", num_layers=1), "8da4w")
    assert isinstance(model.layers[0].attn.q_proj, Int8DynActInt4Linear)
    assert type(model.tok_embeddings.weight) is nn.Parameter  # the tied output head reads this float weight


def test_quantized_tiny_model_logits_close_to_float():
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=2).eval()
    tokens = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        for scheme, tol in [("8w", 0.03), ("8da8w", 0.03), ("4w", 0.15), ("8da4w", 0.15)]:
            q = quantize_for_inference(copy.deepcopy(model), scheme)
            assert _rel(q(tokens), ref) < tol, scheme


def test_none_is_identity_and_dtype_override():
    m = _lin()
    w = m[0].weight
    assert quantize_for_inference(m, None) is m and m[0].weight is w
    assert quantize_for_inference(m, "none")[0].weight.dtype == torch.float32
    m2 = quantize_for_inference(_lin(), "4w", dtype=torch.float32)
    assert m2[0].weight.dtype == torch.float32
    assert quantize_for_inference(_lin(), "none", dtype=torch.bfloat16)[0].weight.dtype == torch.bfloat16


def test_model_bytes_counts_packed_weights():
    m = quantize_for_inference(_lin(256, 512), "4w")  # g128: int4 codes + bf16 (scale, zero) per group
    assert model_bytes(m) == 512 * 256 // 2 + (256 // 128) * 512 * 2 * 2
    assert model_bytes(_lin(256, 512, bias=True)) == (512 * 256 + 512) * 4


def test_global_inductor_config_and_matmul_precision_untouched():
    import torch._inductor.config as cfg

    before = (
        cfg.coordinate_descent_tuning,
        cfg.force_fuse_int_mm_with_mul,
        torch.get_float32_matmul_precision(),
    )
    for scheme in ["8w", "8da8w", "4w", "8da4w"]:
        quantize_for_inference(_lin(), scheme)
    assert (cfg.coordinate_descent_tuning, cfg.force_fuse_int_mm_with_mul,
            torch.get_float32_matmul_precision()) == before


@pytest.mark.parametrize(
    "scheme, kwargs, match",
    [
        ("int3", {}, "unknown inference scheme 'int3'"),
        ("none", {"group_size": 32}, "group_size=32"),
        ("4w", {"group_size": 48}, "group_size"),
        ("8w", {"group_size": 32}, "group_size"),
        ("4w", {"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_input_errors(scheme, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_for_inference(_lin(), scheme, **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_for_inference(torch.zeros(3), "4w")


@pytest.mark.parametrize("scheme", ["8da4w", "8da3w", "8da2w"])
def test_learned_qparams_on_the_bf16_int4pack_path_match_the_converted_model(scheme):
    """Learned scales reach the tinygemm kernel: bf16 deployment == lowbit.qat.convert of the prepared
    model in bf16 (torchao's own IntxUnpackedToInt8Tensor with the learned qparams), within bf16 rounding."""
    from lowbit import qat

    torch.manual_seed(0)
    m = _lin(in_f=128, out_f=64).bfloat16()
    prepared = qat.prepare(copy.deepcopy(m), scheme, group_size=32, learn_ranges=True)
    with torch.no_grad():
        prepared[0].weight_scale.mul_(torch.rand_like(prepared[0].weight_scale) + 0.5)
    learned = {k: v.detach().clone() for k, v in qat.learned_qparams(prepared).items()}
    reference = qat.convert(copy.deepcopy(prepared))  # the weights torchao holds, learned qparams written
    ptq = qat.convert(qat.prepare(copy.deepcopy(m), scheme, group_size=32))
    assert not torch.equal(reference[0].weight.scale, ptq[0].weight.scale)
    deployed = quantize_for_inference(m, scheme, group_size=32, qparams=learned)
    assert isinstance(deployed[0], Int8DynActInt4Linear)
    x = torch.randn(7, 128).bfloat16()
    with torch.no_grad():
        assert _rel(deployed(x), reference(x)) < 1e-2
    with pytest.raises(ValueError, match="learned qparam '0.weight_bias'"):
        quantize_for_inference(_lin(in_f=128, out_f=64), scheme, group_size=32,
                               qparams={"0.weight_bias": learned["0.weight_scale"]})
