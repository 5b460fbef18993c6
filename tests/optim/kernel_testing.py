"""The test build of the CPU step (``tests/optim/csrc/kernel_testing.cpp``): the step's other
implementations (scalar only, table encode, every 8-bit lane unsure) and the encode check."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from torch import Tensor

from lowbit.optim import _cpu_kernel
from lowbit.quant import blockwise

_lib = None


def library() -> ctypes.CDLL:
    """The test library (built once; skips the test where it cannot be built)."""
    global _lib
    if _lib is None:
        if _cpu_kernel.get() is None:
            pytest.skip("CPU kernel unavailable")
        _lib = _cpu_kernel.build_library(
            Path(__file__).parent / "csrc" / "kernel_testing.cpp", "lowbit_adam_test"
        )
        _lib.lowbit_test_adam_step.restype = ctypes.c_int
        _lib.lowbit_test_adam_step.argtypes = [ctypes.POINTER(_cpu_kernel.StepArgs)] + [ctypes.c_int] * 3
        _lib.lowbit_encode_check.restype = ctypes.c_int64
        P = ctypes.c_void_p
        _lib.lowbit_encode_check.argtypes = [
            ctypes.c_int,
            P,
            P,
            P,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint32),
        ]
    return _lib


def use_variant(monkeypatch, scalar_only=False, table_encode=False, all_unsure=False) -> None:
    """Make the optimizers' C++ step run this implementation variant (for the rest of the test)."""
    lib = library()

    def step(_lib, *args):
        st, _keep = _cpu_kernel.make_args(*args)
        rc = lib.lowbit_test_adam_step(ctypes.byref(st), scalar_only, table_encode, all_unsure)
        assert rc == 0, rc

    monkeypatch.setattr(_cpu_kernel, "step", step)


def encode_check(
    name: str, u_lo: int, u_hi: int, qmap: Tensor | None = None, no_fallback: bool = False
) -> tuple[int, int]:
    """Compare the kernel's arithmetic encode with its cell-table encode on every finite fp32 bit pattern
    in ``[u_lo, u_hi)`` and its negative.

    ``qmap``: build the arithmetic encode from this map instead of codebook ``name`` (the table always
    comes from ``name``); ``no_fallback``: 8-bit maps skip the table re-encode of lanes in the unsure band
    (a broken encode the check must catch). Returns ``(mismatches, first mismatching bit pattern)``;
    mismatches is -1 where the map gets no arithmetic encode.
    """
    q, table, meta = _cpu_kernel.codec_tables(name)
    q = q if qmap is None else qmap.float().contiguous()
    first = ctypes.c_uint32(0)
    n = library().lowbit_encode_check(
        blockwise.codebook_bits(name),
        q.data_ptr(),
        table.data_ptr(),
        meta.data_ptr(),
        u_lo,
        u_hi,
        int(no_fallback),
        ctypes.byref(first),
    )
    return int(n), int(first.value)
