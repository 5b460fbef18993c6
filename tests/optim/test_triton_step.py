"""The Triton step kernels (run on CPU tensors by Triton's interpreter) equal the slow reference step bit
for bit; one launch per bucket; state dicts move between backends; the compiled GPU code has no
contraction, approximation or denormal flushing, so the interpreter's bits are the device's bits."""

import io
import re

import pytest
import torch

from lowbit import optim as lo
from lowbit.optim import _cpu_kernel, backend

from .reference import bits_equal
from .test_step_exact import _run

triton = pytest.importorskip("triton")
from lowbit.optim import _triton_step  # noqa: E402  (needs triton)

BLOCK = {"8bit": 256, "4bit": 128, "fp8": 256}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_matches_reference(fmt, dtype, books, monkeypatch):
    # six parameters in two buckets (quantized, fp32 state), sizes off the block multiples, NaN / inf
    # gradient elements in the second step
    _run("triton", fmt, True, dtype, BLOCK[fmt], False, False, books, monkeypatch, steps=2, nonfinite=True)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "fp8"])
def test_maximize_coupled_weight_decay_odd_block_matches_reference(fmt, books, monkeypatch):
    _run("triton", fmt, False, torch.float32, 200, False, True, books, monkeypatch, steps=2, seed=1)


@pytest.mark.parametrize("seed", [2, 3])
def test_bf16_stochastic_rounding_matches_reference(seed, books, monkeypatch):
    _run("triton", "8bit", True, torch.bfloat16, 64, True, False, books, monkeypatch, steps=2, seed=seed)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.GELU(), torch.nn.Linear(80, 64)).to(dtype)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        (model(x).float() - x.float().flip(1)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "cls,first,second",
    [(lo.AdamW8bit, "triton", "cpp"), (lo.AdamW4bit, "cpp", "triton"), (lo.AdamWFp8, "torch", "triton")],
)
def test_state_dict_resumes_on_another_backend(cls, first, second, monkeypatch):
    if "cpp" in (first, second) and _cpu_kernel.get() is None:
        pytest.skip("CPU kernel unavailable")
    dtype = torch.bfloat16
    monkeypatch.setenv(backend.ENV, first)
    m_a = _model(dtype)
    o_a = cls(m_a.parameters(), lr=1e-2, min_quant_size=1024, bf16_stochastic_round=True)
    _train(m_a, o_a, 2, seed=1)
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "optim": o_a.state_dict()}, buf)
    torch.manual_seed(7)  # the stochastic-rounding seeds of the next steps
    _train(m_a, o_a, 2, seed=2)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    monkeypatch.setenv(backend.ENV, second)
    m_b = _model(dtype)
    m_b.load_state_dict(ck["model"])
    o_b = cls(m_b.parameters(), lr=1e-2, min_quant_size=1024, bf16_stochastic_round=True)
    o_b.load_state_dict(ck["optim"])
    torch.manual_seed(7)
    _train(m_b, o_b, 2, seed=2)
    for a, b in zip(m_a.parameters(), m_b.parameters()):
        assert bits_equal(a, b)
        for k in o_a.state[a]:
            assert bits_equal(o_a.state[a][k], o_b.state[b][k]), k


def _count_launches(monkeypatch):
    kern = _triton_step.kernel(interpret=True)
    launches = []
    run = kern.run

    def counting_run(*args, **kwargs):
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        launches.append((args[-1], tuple(sorted(consts.items()))))  # (block_size arg, constexprs)
        return run(*args, **kwargs)

    monkeypatch.setattr(kern, "run", counting_run)
    return launches


def test_one_launch_per_bucket_and_no_respecialization(monkeypatch):
    """Two param groups, each with quantized and fp32-state parameters: 4 buckets, 4 launches per step;
    changing lr, step and parameter shapes launches the same specialization (no recompilation)."""
    monkeypatch.setenv(backend.ENV, "triton")
    launches = _count_launches(monkeypatch)
    m = _model()
    groups = [{"params": [m[0].weight, m[0].bias]}, {"params": [m[2].weight, m[2].bias], "lr": 1e-3}]
    opt = lo.AdamW8bit(groups, lr=1e-2, min_quant_size=1024)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for step in range(3):
        _train(m, opt, 1, seed=step)
        sched.step()
        assert len(launches) == 4 * (step + 1), launches
    # other shapes (sizes still multiples of 16, which the ALIGNED specialization depends on): same
    # specializations as before
    m2 = torch.nn.Sequential(torch.nn.Linear(48, 112), torch.nn.GELU(), torch.nn.Linear(112, 64))
    seen = {key for _, key in launches}
    opt2 = lo.AdamW8bit(m2.parameters(), lr=3e-3, min_quant_size=1024)
    x = torch.randn(4, 48)
    m2(x).pow(2).mean().backward()
    opt2.step()
    assert {key for _, key in launches[12:]} <= seen


def test_rank1_bucket_launches_twice(monkeypatch):
    monkeypatch.setenv(backend.ENV, "triton")
    launches = _count_launches(monkeypatch)
    kern = _triton_step.kernel(True, "_rank1_max_kernel")
    first = []
    monkeypatch.setattr(kern, "run", lambda *a, _run=kern.run, **k: first.append(1) or _run(*a, **k))
    ws = [torch.nn.Parameter(torch.randn(40, 130)), torch.nn.Parameter(torch.randn(70, 64))]
    opt = lo.AdamW4bit(ws, lr=1e-2, min_quant_size=1024, v_norm="rank1")
    for _ in range(2):
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
    assert len(first) == len(launches) == 2  # per step: one pass-1 and one pass-2 launch for both parameters


def test_launch_skips_empty_parameters(monkeypatch):
    monkeypatch.setenv(backend.ENV, "triton")
    launches = _count_launches(monkeypatch)
    p, e = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.zeros(0, 4))
    opt = lo.AdamW4bit([p, e], lr=1e-2, min_quant_size=1024)
    p.grad, e.grad = torch.randn(5000), torch.zeros(0, 4)
    opt.step()
    assert len(launches) == 1 and torch.isfinite(p).all()


def test_compiled_kernel_has_exact_fp32_ops():
    """The CUDA build (sm_90 PTX, compiled here without a GPU): no fused multiply-add, no approximate
    or flush-to-zero instruction; division and square root are the correctly rounded ``.rn`` forms."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        k = _triton_step.kernel(interpret=False)
        sig = {n: "*i64" for n in ("static_ptr", "step_ptr", "prog_ptr")}
        sig.update(
            {n: "*fp32" for n in ("hyper_ptr", "qm_ptr", "qv_ptr")}, tm_ptr="*i32", tv_ptr="*i32", bs="i32"
        )
        sig_names = list(k.arg_names) if hasattr(k, "arg_names") else list(sig)
        sig = {n: sig[n] for n in sig_names if n in sig}
        ptx = {}
        for mode, pkind, sr in [(0, 0, False), (1, 1, True), (2, 2, False), (3, 1, False), (4, 1, True)]:
            block = 128 if mode in (2, 4) else 256
            const = dict(
                MODE=mode,
                PKIND=pkind,
                BLOCK=block,
                ROWS=_triton_step.ELEMS // block,
                MAXIMIZE=True,
                COUPLED=True,
                SR=sr,
                ALIGNED=True,
            )
            src = ASTSource(
                fn=k,
                signature={**sig, **dict.fromkeys(const, "constexpr")},
                constexprs=const,
                attrs={(sig_names.index("bs"),): [["tt.divisibility", 16]]},
            )  # as a launch does
            ptx[mode] = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 8}
            ).asm["ptx"]
        r1 = _triton_step.kernel(interpret=False, name="_rank1_max_kernel")
        const = dict(
            PKIND=1, BLOCK=128, ROWS=_triton_step.ELEMS // 128, MAXIMIZE=True, COUPLED=True, ALIGNED=True
        )
        sig1 = {
            **{k: sig[k] for k in ("static_ptr", "step_ptr", "hyper_ptr", "prog_ptr", "qv_ptr", "bs")},
            **dict.fromkeys(const, "constexpr"),
        }
        ptx["rank1 pass 1"] = triton.compile(
            ASTSource(fn=r1, signature=sig1, constexprs=const),
            target=GPUTarget("cuda", 90, 32),
            options={"enable_fp_fusion": False, "num_warps": 8},
        ).asm["ptx"]
    except Exception as e:  # no CUDA toolchain in this triton build
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    for mode, text in ptx.items():
        ops = set(re.findall(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)", text, re.M))
        fp = {o for o in ops if re.search(r"\.(f32|f16|bf16)\b", o)}
        assert not {o for o in fp if o.startswith("fma") or ".approx" in o or ".ftz" in o}, (mode, fp)
        assert not any(o.startswith("rcp") for o in fp), fp
        if mode != "rank1 pass 1":
            assert "div.rn.f32" in fp and "sqrt.rn.f32" in fp, fp
            # aligned tensors: parameters, gradients and codes move as 16-byte vectors
            assert any(o.startswith(("ld.global.v4", "ld.global.v2")) for o in ops), (mode, sorted(ops))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv(backend.ENV, "cuda")
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    with pytest.raises(ValueError, match=r"LOWBIT_OPTIM_BACKEND='cuda'.*auto, cpp, triton, torch"):
        lo.AdamW8bit([p]).step()


def test_forced_backend_that_cannot_run_names_the_parameter(monkeypatch):
    m = torch.nn.Linear(4, 4).double()
    opt = lo.AdamW8bit(m.named_parameters())
    m(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    monkeypatch.setenv(backend.ENV, "triton")
    with pytest.raises(ValueError, match=r"Triton kernel cannot update parameter 'weight'.*float64"):
        opt.step()
    monkeypatch.setenv(backend.ENV, "cpp")
    with pytest.raises(ValueError, match=r"C\+\+ kernel cannot update parameter 'weight'"):
        opt.step()


class _FakeCuda:
    """Stands in for a CUDA tensor in the backend choice (this test runs without a GPU)."""

    device = torch.device("cuda", 0)
    dtype = torch.bfloat16

    def is_contiguous(self):
        return True


def test_cuda_without_triton_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(backend, "_triton_checked", True)
    monkeypatch.setattr(backend, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv(backend.ENV, raising=False)
    t = _FakeCuda()
    with pytest.warns(RuntimeWarning, match="Triton is not importable.*pure-torch step") as w:
        assert [backend.choose(t, t, "p") for _ in range(3)] == ["torch"] * 3
    assert len(w) == 1
    monkeypatch.setattr(backend, "_triton_error", None)
    assert backend.choose(t, t, "p") == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [lo.AdamW8bit, lo.AdamW4bit, lo.AdamWFp8])
def test_cuda_kernel_matches_interpreter(cls, monkeypatch):
    monkeypatch.setenv(backend.ENV, "triton")
    out = []
    for device in ("cpu", "cuda"):
        m = _model(torch.bfloat16).to(device)
        o = cls(m.parameters(), lr=1e-2, min_quant_size=1024, bf16_stochastic_round=True)
        torch.manual_seed(3)
        _train(m, o, 3, seed=0)
        out.append((list(m.parameters()), o))
    (pa, oa), (pb, ob) = out
    for a, b in zip(pa, pb):
        assert bits_equal(a, b)
        assert all(bits_equal(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])
