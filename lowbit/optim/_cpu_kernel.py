"""Build (at first use, cached) and call the fused C++ CPU step in ``csrc/adam_cpu.cpp``.

The library has a plain C ABI (no torch headers, so it builds in seconds) and is called through
ctypes with raw pointers; the call releases the GIL and runs on ``torch.get_num_threads()``
OpenMP threads. It is built with ``-march=native``, so the cache key includes the CPU flags.
Set ``LOWBIT_NO_CPU_KERNEL=1`` to force the pure-torch step.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lowbit.quant import blockwise

from .formats import StateFormat

_SRC = Path(__file__).parent / "csrc" / "adam_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno"]
_lib = None
_failed: str | None = None
SCALAR_ONLY = False  # tests: run the kernel's scalar path everywhere (no AVX2 lanes)
TABLE_ENCODE = False  # tests, benchmarks: encode 8-bit / 4-bit codes with the cell-table gather
ALL_UNSURE = False  # tests: every lane of the 8-bit arithmetic encode is re-encoded by the table


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build() -> ctypes.CDLL:
    from torch.utils import cpp_extension

    key = hashlib.sha256((_SRC.read_text() + " ".join(_FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    name = f"lowbit_adam_cpu_{key}"
    root = Path(os.environ.get("LOWBIT_EXTENSIONS_DIR", Path.home() / ".cache" / "lowbit" / "extensions"))
    build_dir = root / name
    so = build_dir / f"{name}.so"
    if not so.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(_SRC)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    lib = ctypes.CDLL(str(so))
    lib.lowbit_adam_step.restype = ctypes.c_int
    P = ctypes.c_void_p
    lib.lowbit_adam_step.argtypes = [
        ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
        P, P, P, P, P, P, P, P, P, P, P, P, P, P, P,
        ctypes.c_int, ctypes.c_int,
    ]
    lib.lowbit_encode_check.restype = ctypes.c_int64
    lib.lowbit_encode_check.argtypes = [ctypes.c_int, P, P, P, ctypes.c_uint32, ctypes.c_uint32,
                                        ctypes.POINTER(ctypes.c_uint32)]
    return lib


def get() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; ``None`` (warned once) if unavailable."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    if os.environ.get("LOWBIT_NO_CPU_KERNEL") == "1":
        _failed = "LOWBIT_NO_CPU_KERNEL=1"
    else:
        try:
            _lib = _build()
        except Exception as e:  # no compiler, no ninja, build error
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if _failed is not None:
        warnings.warn(
            f"lowbit.optim: the fused C++ CPU step is unavailable ({_failed}); using the pure-torch "
            "step, which is several times slower. Install a C++ compiler and `ninja` to enable it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _lib


def failure() -> str | None:
    """Why the kernel is unavailable (``None`` if it loaded or was not tried yet)."""
    return _failed


def supports(p: Tensor, g: Tensor) -> bool:
    """Whether the kernel can update ``p`` with gradient ``g`` in place."""
    return (
        p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.bfloat16)
        and g.dtype == p.dtype
        and p.is_contiguous()
        and g.is_contiguous()
    )


_tables: dict[str, tuple] = {}


def _codec(name: str | None):
    if name is None:  # fp8: decode table of all 256 e4m3 bit patterns
        name = "__fp8__"
        if name not in _tables:
            q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
            _tables[name] = (q.contiguous(), None, None)
        return _tables[name]
    if name not in _tables:
        table, meta = blockwise.encode_cell_table(name)
        m = torch.tensor([meta["a_lo"], meta["a_hi"], meta["shift"], meta["ncells"]], dtype=torch.int32)
        _tables[name] = (blockwise.codebook(name).contiguous(), table.contiguous(), m)
    return _tables[name]


def encode_check(lib: ctypes.CDLL, name: str, u_lo: int, u_hi: int, qmap: Tensor | None = None,
                 no_fallback: bool = False) -> tuple[int, int]:
    """Compare the kernel's arithmetic encode with its cell-table encode on every finite fp32 bit
    pattern in ``[u_lo, u_hi)`` and its negative (tests).

    ``qmap``: build the arithmetic encode from this map instead of codebook ``name`` (the table
    always comes from ``name``); ``no_fallback``: 8-bit maps skip the table re-encode of lanes in
    the unsure band (a broken encode the check must catch). Returns ``(mismatches, first mismatching bit pattern)``;
    mismatches is -1 where the map gets no arithmetic encode.
    """
    q, table, meta = _codec(name)
    q = q if qmap is None else qmap.float().contiguous()
    first = ctypes.c_uint32(0)
    bits = blockwise.codebook_bits(name) | (256 if no_fallback else 0)
    n = lib.lowbit_encode_check(bits, q.data_ptr(), table.data_ptr(), meta.data_ptr(),
                                u_lo, u_hi, ctypes.byref(first))
    return int(n), int(first.value)


def _ptrs(ts: list[Tensor]):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def step(lib: ctypes.CDLL, params: list[Tensor], grads: list[Tensor], states: list[dict], fmt: StateFormat | None,
         block_size: int, hyper: Tensor, seeds: list[int], maximize: bool, coupled: bool, stochastic: bool,
         scalar_only: bool | None = None) -> None:
    """Update ``params`` (same dtype, CPU, contiguous) and their states in one fused call.

    ``hyper``: fp32 ``[len(params), 9]`` rows (see ``_torch_step.HYPER_FIELDS``); ``fmt=None`` for
    fp32 states (then ``block_size`` is only the work granularity).
    """
    if fmt is None:
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        ms = vs = None
        mode = 0
        cm = cv = (None, None, None)
    else:
        m = [s["exp_avg_codes"] for s in states]
        v = [s[f"{fmt.v_key}_codes"] for s in states]
        ms = _ptrs([s["exp_avg_scale"] for s in states])
        vs = _ptrs([s[f"{fmt.v_key}_scale"] for s in states])
        mode = fmt.mode
        cm, cv = _codec(fmt.m_codebook), _codec(fmt.v_codebook)
    hyper = hyper.contiguous()
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    seeds_t = torch.tensor(seeds, dtype=torch.int64).to(torch.int32)  # low 32 bits
    scalar_only = SCALAR_ONLY if scalar_only is None else scalar_only
    flags = (1 if maximize else 0) | (2 if coupled else 0) | (4 if stochastic else 0) | (8 if scalar_only else 0)
    flags |= (16 if TABLE_ENCODE else 0) | (32 if ALL_UNSURE else 0)

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = lib.lowbit_adam_step(
        len(params), mode, 1 if params[0].dtype == torch.bfloat16 else 0, block_size,
        _ptrs(params), _ptrs(grads), _ptrs(m), ms, _ptrs(v), vs,
        numels.data_ptr(), hyper.data_ptr(), seeds_t.data_ptr(),
        ptr(cm[0]), ptr(cv[0]), ptr(cm[1]), ptr(cm[2]), ptr(cv[1]), ptr(cv[2]),
        flags, torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"lowbit.optim CPU kernel rejected its arguments (code {rc})")
