"""torch.optim.AdamW semantics, state dicts, bad input, non-finite isolation, memory."""

import io
import math
import warnings

import pytest
import torch

from lowbit import optim as lo
from lowbit.optim import _cpu_kernel

from .reference import bits_equal, reference_step

ALL = [lo.AdamW8bit, lo.AdamW4bit, lo.AdamWFp8, lo.Adam8bit, lo.Adam4bit, lo.AdamFp8]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))


def _train(model, opt, steps, seed=0, sched=None):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = (model(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", ALL)
def test_trains_like_torch_adamw(cls):
    m_ref, m = _model(), _model()
    torch_cls = torch.optim.AdamW if cls.__name__.startswith("AdamW") else torch.optim.Adam
    ref = _train(m_ref, torch_cls(m_ref.parameters(), lr=3e-3, weight_decay=0.01), 60)
    got = _train(m, cls(m.parameters(), lr=3e-3, weight_decay=0.01, min_quant_size=1024), 60)
    assert got[-1] < 0.7 * got[0]
    assert abs(got[-1] - ref[-1]) / ref[-1] < 0.05, (got[-1], ref[-1])


def test_small_tensors_keep_fp32_state_and_match_torch_adamw():
    # below min_quant_size the state is fp32 and the step is AdamW's (up to rounding order)
    m_ref, m = _model(), _model()
    o_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, weight_decay=0.1)
    o = lo.AdamW8bit(m.parameters(), lr=1e-2, weight_decay=0.1, min_quant_size=10**9)
    _train(m_ref, o_ref, 5)
    _train(m, o, 5)
    for a, b in zip(m_ref.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    st = o.state[m[0].weight]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["exp_avg"].dtype == torch.float32


def test_param_groups_per_group_hparams_tensor_lr_scheduler_add_param_group():
    m = _model()
    opt = lo.AdamW8bit(
        [
            {"params": m[0].parameters(), "lr": torch.tensor(1e-2)},
            {"params": m[2].weight, "weight_decay": 0.0},
        ],
        lr=1e-3,
        weight_decay=0.5,
        min_quant_size=1024,
    )
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["lr"] == 1e-3
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    b = m[2].bias.detach().clone()
    _train(m, opt, 4, sched=sched)
    assert torch.equal(m[2].bias.detach(), b)  # not in any group yet
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-4)
    opt.add_param_group({"params": [m[2].bias], "lr": 5e-3})
    _train(m, opt, 2)
    assert not torch.equal(m[2].bias.detach(), b)
    assert float(opt.state[m[0].weight]["step"]) == 6 and float(opt.state[m[2].bias]["step"]) == 2


def test_lr_tensor_equals_float_lr():
    m1, m2 = _model(), _model()
    o1 = lo.AdamW4bit(m1.parameters(), lr=torch.tensor(2e-3, dtype=torch.float64), min_quant_size=1024)
    o2 = lo.AdamW4bit(m2.parameters(), lr=2e-3, min_quant_size=1024)
    _train(m1, o1, 3)
    _train(m2, o2, 3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_named_parameters_and_errors_name_them():
    m = _model()
    opt = lo.AdamW8bit(m.named_parameters(), lr=1e-3, min_quant_size=1024)
    _train(m, opt, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"][:-1]
    fresh = lo.AdamW8bit(_model().named_parameters(), lr=1e-3, min_quant_size=1024)
    with pytest.raises(ValueError, match=r"'0\.weight'.*exp_avg_codes"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit, lo.AdamWFp8])
def test_state_dict_weights_only_and_bit_exact_resume(cls):
    m_a = _model()
    o_a = cls(m_a.parameters(), lr=1e-2, min_quant_size=1024)
    _train(m_a, o_a, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "optim": o_a.state_dict()}, buf)
    _train(m_a, o_a, 4, seed=2)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m_b = _model(seed=5)
    m_b.load_state_dict(ck["model"])
    o_b = cls(m_b.parameters(), lr=1e-2, min_quant_size=1024)
    o_b.load_state_dict(ck["optim"])
    st = o_b.state[m_b[0].weight]
    want = torch.float8_e4m3fn if cls is lo.AdamWFp8 else torch.uint8
    assert st["exp_avg_codes"].dtype == want and st["exp_avg_scale"].dtype == torch.float32
    _train(m_b, o_b, 4, seed=2)
    for a, b in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(m_a.parameters(), m_b.parameters()):
        for k in o_a.state[a]:
            assert bits_equal(o_a.state[a][k], o_b.state[b][k])


def test_bf16_params_keep_state_dtypes_through_state_dict():
    m = _model().to(torch.bfloat16)
    o = lo.AdamW8bit(m.parameters(), lr=1e-3, min_quant_size=1024)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    m(x).float().pow(2).mean().backward()
    o.step()
    o2 = lo.AdamW8bit(m.parameters(), lr=1e-3, min_quant_size=1024)
    o2.load_state_dict(o.state_dict())
    assert o2.state[m[0].bias]["exp_avg"].dtype == torch.float32  # small: fp32 state, not cast to bf16
    assert o2.state[m[0].weight]["exp_avg_scale"].dtype == torch.float32


def test_load_state_dict_of_other_format_fails_naming_param():
    m = _model()
    o8 = lo.AdamW8bit(m.parameters(), lr=1e-3, min_quant_size=1024)
    _train(m, o8, 1)
    o4 = lo.AdamW4bit(m.parameters(), lr=1e-3, min_quant_size=1024)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*4bit"):
        o4.load_state_dict(o8.state_dict())
    ofp8 = lo.AdamWFp8(m.parameters(), lr=1e-3, min_quant_size=1024)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*fp8.*exp_avg_sqrt_codes"):
        ofp8.load_state_dict(o8.state_dict())
    t = torch.optim.AdamW(m.parameters(), lr=1e-3)
    _train(m, t, 1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*expected keys"):
        lo.AdamW8bit(m.parameters(), lr=1e-3, min_quant_size=1024).load_state_dict(t.state_dict())


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"amsgrad": True}, ValueError, "amsgrad"),
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"betas": (1.0, 0.999)}, ValueError, "beta1"),
        ({"betas": (0.9, -0.1)}, ValueError, "beta2"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"block_size": 100}, ValueError, "block_size"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"min_quant_size": -1}, ValueError, "min_quant_size"),
    ],
)
def test_bad_hparams(kwargs, err, match):
    with pytest.raises(err, match=match):
        lo.AdamW8bit(_model().parameters(), **kwargs)


def test_bad_params_and_grads():
    with pytest.raises(TypeError, match="complex"):
        lo.AdamW8bit([torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point.*int64"):
        lo.AdamW8bit([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"param_groups\[1\].*beta1"):
        lo.AdamW8bit([torch.nn.Parameter(torch.zeros(4))]).add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(4))], "betas": (1.5, 0.9)}
        )
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lo.AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"sparse gradients.*param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit, lo.AdamWFp8])
def test_non_finite_gradient_is_isolated(cls, books):
    block = 64
    p = torch.nn.Parameter(torch.randn(8 * block))
    q = torch.nn.Parameter(torch.randn(4096))
    opt = cls([p, q], lr=1e-2, block_size=block, min_quant_size=256)
    for _ in range(2):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    q_state = {k: v.clone() for k, v in opt.state[q].items()}
    p0 = p.detach().clone()
    g = torch.randn_like(p)
    g[3 * block + 5] = float("nan")
    g[3 * block + 9] = float("inf")
    p.grad, q.grad = g, torch.randn_like(q)
    opt.step()
    # other blocks of p and parameter q: exactly as the reference computes them
    fmt = {lo.AdamW8bit: "8bit", lo.AdamW4bit: "4bit", lo.AdamWFp8: "fp8"}[cls]
    ref_p, ref_s = reference_step(
        p0,
        g,
        before,
        fmt,
        block,
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        decoupled=True,
        maximize=False,
        books=books,
    )
    assert bits_equal(p.data, ref_p) and all(bits_equal(opt.state[p][k], v) for k, v in ref_s.items())
    bad = torch.zeros(p.numel(), dtype=torch.bool)
    bad[3 * block + 5] = bad[3 * block + 9] = True
    assert torch.isnan(p.data[bad]).all() and torch.isfinite(p.data[~bad]).all()
    assert all(torch.isfinite(t).all() for k, t in opt.state[p].items() if k.endswith("_scale"))
    assert float(opt.state[q]["step"]) == float(q_state["step"]) + 1
    # the next step with a finite gradient: every element except the two hit stays finite
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.isfinite(p.data[~bad]).all()


@pytest.mark.parametrize(
    "cls,code_bytes,block", [(lo.AdamW8bit, 1.0, 256), (lo.AdamWFp8, 1.0, 256), (lo.AdamW4bit, 0.5, 128)]
)
def test_state_bytes_per_param(cls, code_bytes, block):
    # the documented layout: two code arrays and two fp32 scales per block for tensors >= min_quant_size,
    # fp32 m and v below it, a 4-byte step for every parameter
    ps = [
        torch.nn.Parameter(torch.randn(1024, 1024)),
        torch.nn.Parameter(torch.randn(999, 7)),
        torch.nn.Parameter(torch.randn(100)),
    ]
    opt = cls(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    want = 0
    for p in ps:
        n = p.numel()
        want += 4 + (2 * math.ceil(n * code_bytes) + 2 * 4 * math.ceil(n / block) if n >= 4096 else 8 * n)
    assert opt.state_bytes() == want
    assert want / sum(p.numel() for p in ps) < 2.2 * code_bytes  # the point: ~2 (8-bit) or ~1 (4-bit) B/param


@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit])
def test_fallback_warns_once_and_matches_kernel(cls, kernel, monkeypatch):
    """Without a C++ kernel the pure-torch step runs, says so once, and computes the kernel's bits."""
    m_k = _model()
    o_k = cls(m_k.parameters(), lr=1e-3, min_quant_size=1024)
    _train(m_k, o_k, 3)

    monkeypatch.setattr(_cpu_kernel, "_lib", None)
    monkeypatch.setattr(_cpu_kernel, "_failed", None)
    monkeypatch.setenv("LOWBIT_NO_CPU_KERNEL", "1")
    m_t = _model()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o_t = cls(m_t.parameters(), lr=1e-3, min_quant_size=1024)
        _train(m_t, o_t, 3)
    assert len([x for x in w if "pure-torch" in str(x.message)]) == 1
    for a, b in zip(m_k.parameters(), m_t.parameters()):
        assert bits_equal(a, b)
        assert all(bits_equal(o_k.state[a][k], o_t.state[b][k]) for k in o_k.state[a])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_state_moves_across_devices():
    m_cpu = _model()
    m_gpu = _model().cuda()
    o_cpu = lo.AdamW8bit(m_cpu.parameters(), lr=1e-2, min_quant_size=1024)
    o_gpu = lo.AdamW8bit(m_gpu.parameters(), lr=1e-2, min_quant_size=1024)
    for _ in range(3):
        for m, o in ((m_cpu, o_cpu), (m_gpu, o_gpu)):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(next(m.parameters()).device)
            o.zero_grad()
            m(x).pow(2).mean().backward()
        g_cpu = [p.grad.clone() for p in m_cpu.parameters()]
        for p, g in zip(m_gpu.parameters(), g_cpu):
            p.grad = g.cuda()
        o_cpu.step()
        o_gpu.step()
    for a, b in zip(m_cpu.parameters(), m_gpu.parameters()):
        assert bits_equal(a, b.cpu())
    o_back = lo.AdamW8bit(m_cpu.parameters(), lr=1e-2, min_quant_size=1024)
    o_back.load_state_dict(o_gpu.state_dict())
    assert o_back.state[m_cpu[0].weight]["exp_avg_codes"].device.type == "cpu"


def test_second_moment_flushed_to_zero_gives_no_step():
    # element 1: |g| = 1e-4 of the block max, so v = g^2 is 1e-8 of the block's v absmax and rounds to
    # 0 in the 8-bit map while m survives; then a zero gradient: m / eps would move it by ~1e2
    p = torch.nn.Parameter(torch.zeros(512))
    opt = lo.AdamW8bit([p], lr=1e-3, weight_decay=0.0, min_quant_size=0)
    g = torch.zeros(512)
    g[0], g[1] = 1.0, 1e-4
    p.grad = g
    opt.step()
    assert (
        opt.state[p]["exp_avg_codes"].view(torch.uint8)[1]
        != opt.state[p]["exp_avg_codes"].view(torch.uint8)[2]
    )
    p.grad = torch.zeros(512)
    opt.step()
    assert abs(p.data[1].item()) <= 1.1e-3  # the first step's -lr * sign(g), and nothing after


def test_fp8_keeps_small_second_moments():
    # gradients spanning 1e-4..1 inside each block: v spans 1e-8..1, below what e4m3 with absmax/448 holds
    # (2**-10 / 448 ~ 2e-6 of the block max), but sqrt(v), which fp8 stores, spans 1e-4..1 and keeps
    # every element's Adam step. Reference: torch.optim.AdamW in fp32 on the same gradients.
    gen = torch.Generator().manual_seed(0)
    n = 4096
    mag = 10 ** (-4 * torch.rand(n, generator=gen))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    p8, p32 = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    o8 = lo.AdamWFp8([p8], lr=1e-3, weight_decay=0.0, min_quant_size=0)
    o32 = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    for _ in range(6):
        g = sign * mag * (1 + 0.3 * torch.randn(n, generator=gen))
        p8.grad, p32.grad = g.clone(), g.clone()
        o8.step()
        o32.step()
    rel = (p8.detach() - p32.detach()).abs() / p32.detach().abs()
    assert rel.max() < 0.1, f"max relative error {rel.max():.3f} at |g| = {mag[rel.argmax()]:.2e}"
    assert "exp_avg_sqrt_codes" in o8.state[p8]
