"""lowbit.quant.ggml against llama.cpp: the ``gguf`` package's quantizer / dequantizer (bytes), and where
llama-cpp-python is installed, ggml's own C functions (quantize_row_q4_0_ref via ggml_quantize_chunk, the
x86 quantize_row_q8_0 for activations, vec_dot_q4_0_q8_0 / vec_dot_q8_0_q8_0)."""

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from lowbit.quant import ggml


def _weights(rows=24, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 1, rows).unsqueeze(1)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = 0.5  # all equal
    w[2, 5], w[2, 9] = -3.0, 3.0  # a tie of magnitudes: the first one (negative) sets the scale
    w[3, 32:64] = torch.arange(32) - 16.0  # exact grid points
    w[4, :32] = torch.randn(32, generator=g) * 1e-30  # tiny scale (fp16 underflow)
    return w


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_bytes_equal_the_gguf_package_quantizer_and_values_its_dequantizer(kind):
    w = _weights()
    quantize, pack, fake = {"q4_0": (ggml.quantize_q4_0, ggml.pack_q4_0, ggml.fake_quant_q4_0),
                            "q8_0": (ggml.quantize_q8_0, ggml.pack_q8_0, ggml.fake_quant_q8_0)}[kind]
    qtype = T.Q4_0 if kind == "q4_0" else T.Q8_0
    ours = pack(*quantize(w))
    ref = quants.quantize(w.numpy(), qtype)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, ref)
    deq = torch.from_numpy(quants.dequantize(ref, qtype).astype(np.float32))
    assert torch.equal(fake(w), deq)


def test_q4_0_rule_on_hand_worked_blocks():
    b = torch.zeros(1, 32)
    b[0, 0], b[0, 1], b[0, 2], b[0, 3] = -4.0, 4.0, 1.0, 0.25  # max |x| is the first (negative): d = 0.5
    q, d = ggml.quantize_q4_0(b)
    assert d.item() == 0.5
    # x / d + 8.5 truncated, clipped at 15: -4 -> 0, 4 -> 16 -> 15, 1 -> 10, 0.25 -> 9 (8.5 + 0.5), 0 -> 8
    assert q[0, 0, :5].tolist() == [0, 15, 10, 9, 8]
    assert ggml.fake_quant_q4_0(b)[0, :4].tolist() == [-4.0, 3.5, 1.0, 0.5]


def test_gradients_pass_straight_through():
    w = _weights(8, 64).requires_grad_()
    (ggml.fake_quant_q4_0(w) * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    x = torch.randn(3, 64, requires_grad=True)
    ggml.fake_quant_act_q8_0(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_activation_rule_against_an_independent_numpy_version():
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)) * 3
    x[0, :32] = 0
    x[1, 7] = 1e4
    b = x.numpy().reshape(5, 4, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    q = np.clip(np.rint(b * inv), -127, 127)  # rint: half to even, as _mm256_round_ps(NEAREST)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    assert torch.equal(ggml.quant_dequant_act_q8_0(x), torch.from_numpy((q * d).reshape(5, 128)))


def test_bad_shape():
    with pytest.raises(ValueError, match="last dim 48 is not a multiple of the ggml block size 32"):
        ggml.quantize_q4_0(torch.zeros(2, 48))


# ---- ggml's own C code (llama-cpp-python's shared libraries) ----

def _libs():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'lowbit[bench]')")
    lib = Path(spec.origin).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
    cpu.ggml_cpu_init()  # fills ggml's fp16 -> fp32 table, which the dot products read
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return base, cpu


_GGML_TYPE = {"q4_0": 2, "q8_0": 8}


def _ggml_quantize(base, w: np.ndarray, kind: str) -> np.ndarray:
    rows, cols = w.shape
    per_row = cols // 32 * (ggml.Q4_0_BLOCK_BYTES if kind == "q4_0" else ggml.Q8_0_BLOCK_BYTES)
    out = np.zeros((rows, per_row), np.uint8)
    w = np.ascontiguousarray(w, np.float32)
    base.ggml_quantize_chunk(_GGML_TYPE[kind], w.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_weight_bytes_equal_ggml_quantize_chunk(kind):
    base, _ = _libs()
    w = _weights(rows=64, cols=512, seed=3)
    quantize, pack = {"q4_0": (ggml.quantize_q4_0, ggml.pack_q4_0),
                      "q8_0": (ggml.quantize_q8_0, ggml.pack_q8_0)}[kind]
    assert np.array_equal(pack(*quantize(w)), _ggml_quantize(base, w.numpy(), kind))


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_fake_quant_dot_product_equals_ggml_vec_dot(kind):
    """llama.cpp's CPU matmul row: quantize_row_q8_0 (activations) then vec_dot_<kind>_q8_0. Our fake
    quant: F.linear of the two fake-quantized operands; equal up to fp32 summation order."""
    base, cpu = _libs()
    k = 1024
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, k, generator=g) * 0.05
    x = torch.randn(k, generator=g)
    xq = np.zeros(k // 32 * ggml.Q8_0_BLOCK_BYTES, np.uint8)
    xs = np.ascontiguousarray(x.numpy())
    cpu.quantize_row_q8_0(ctypes.c_void_p(xs.ctypes.data), ctypes.c_void_p(xq.ctypes.data), ctypes.c_int64(k))
    # the activation bytes llama.cpp made equal ours
    ours_x = ggml.pack_q8_0(*_act_codes(x))
    assert np.array_equal(ours_x, xq)
    wq = _ggml_quantize(base, w.numpy(), kind)
    dot = getattr(cpu, f"ggml_vec_dot_{kind}_q8_0")
    wfq = ggml.fake_quant_q4_0(w) if kind == "q4_0" else ggml.fake_quant_q8_0(w)
    ref = (ggml.quant_dequant_act_q8_0(x).double() @ wfq.double().t()).float()
    got = []
    for r in range(w.shape[0]):
        s = ctypes.c_float()
        row = np.ascontiguousarray(wq[r])
        dot(ctypes.c_int(k), ctypes.byref(s), ctypes.c_size_t(0), ctypes.c_void_p(row.ctypes.data),
            ctypes.c_size_t(0), ctypes.c_void_p(xq.ctypes.data), ctypes.c_size_t(0), ctypes.c_int(1))
        got.append(s.value)
    got = torch.tensor(got)
    scale = (ggml.quant_dequant_act_q8_0(x).abs() @ wfq.abs().t())
    assert ((got - ref).abs() <= 1e-6 * scale).all(), (got - ref).abs().max()


def _act_codes(x: torch.Tensor):
    """Our activation codes and fp16 scales (the fake quant's integers), for the byte comparison."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127 / amax)
    q = torch.round(b * inv).clamp(-127, 127).to(torch.int8)
    d = (amax / 127).half().squeeze(-1)
    assert torch.equal(ggml.quant_dequant_act_q8_0(x), (q.float() * d.float().unsqueeze(-1)).reshape(-1))
    return q, d
