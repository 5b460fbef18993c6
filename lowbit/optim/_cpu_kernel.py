"""Build (at first use, cached) and call the fused C++ CPU step in ``csrc/`` (see ``csrc/adam_cpu.cpp``).

The library has a plain C ABI (no torch headers, so it builds in seconds): one call takes a
``lowbit_step_args`` struct (``csrc/abi.h``, mirrored by :class:`StepArgs`) of raw pointers, releases the
GIL and runs on ``torch.get_num_threads()`` OpenMP threads. It is built with ``-march=native``, so the
cache key includes the CPU flags. Set ``LOWBIT_NO_CPU_KERNEL=1`` to force the pure-torch step.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import os
import platform
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lowbit.quant import blockwise

from .formats import StateFormat

CSRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno"]
_lib = None
_failed: str | None = None


def _enum(name: str) -> dict[str, int]:
    """``{member: value}`` of C enum ``name`` in ``csrc/abi.h`` (the one definition of the ABI's numbers)."""
    text = (CSRC / "abi.h").read_text()
    body = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    return {k: int(v) for k, v in re.findall(r"^\s*LOWBIT_(\w+)\s*=\s*(\d+)\s*,", body.group(1), re.M)}


StepFlag = enum.IntFlag("StepFlag", _enum("lowbit_step_flag"))
"""Bits of ``StepArgs.flags``: ``MAXIMIZE``, ``COUPLED``, ``STOCHASTIC_ROUND``."""
MODES = _enum("lowbit_mode")
"""``{"MODE_FP32": 0, "MODE_Q8": 1, "MODE_Q4": 2, "MODE_FP8": 3, "MODE_Q4_RANK1": 4}``
(``StateFormat.mode``)."""

_P = ctypes.c_void_p


class StepArgs(ctypes.Structure):
    """``struct lowbit_step_args`` of ``csrc/abi.h`` (field for field; its size is checked at load)."""

    _fields_ = [
        ("n_params", ctypes.c_int64),
        ("mode", ctypes.c_int32),
        ("param_bf16", ctypes.c_int32),
        ("block_size", ctypes.c_int64),
        ("params", _P),
        ("grads", _P),
        ("m_data", _P),
        ("m_scale", _P),
        ("v_data", _P),
        ("v_scale", _P),
        ("numels", _P),
        ("hyper", _P),
        ("seeds", _P),
        ("qmap_m", _P),
        ("qmap_v", _P),
        ("table_m", _P),
        ("table_v", _P),
        ("meta_m", _P),
        ("meta_v", _P),
        ("v_row", _P),
        ("v_col", _P),
        ("cols", _P),
        ("flags", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
    ]


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def build_library(source: Path, prefix: str) -> ctypes.CDLL:
    """Compile ``source`` (a C++ file including ``csrc/`` headers) into a shared library, cached by the
    contents of ``source`` and ``csrc/``, the flags and the CPU; load it and check the ABI struct's size."""
    from torch.utils import cpp_extension

    parts = [source.read_text()] + [f.read_text() for f in sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256(("".join(parts) + " ".join(_FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    name = f"{prefix}_{key}"
    root = Path(os.environ.get("LOWBIT_EXTENSIONS_DIR", Path.home() / ".cache" / "lowbit" / "extensions"))
    build_dir = root / name
    so = build_dir / f"{name}.so"
    if not so.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=_FLAGS,
            extra_include_paths=[str(CSRC)],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    lib = ctypes.CDLL(str(so))
    size_fn = getattr(lib, "lowbit_step_args_size", None) or lib.lowbit_test_step_args_size
    size_fn.restype = ctypes.c_int64
    if size_fn() != ctypes.sizeof(StepArgs):
        raise RuntimeError(
            f"{so}: struct lowbit_step_args is {size_fn()} bytes, StepArgs "
            f"{ctypes.sizeof(StepArgs)}: csrc/abi.h and _cpu_kernel.StepArgs disagree"
        )
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
            _lib = build_library(CSRC / "adam_cpu.cpp", "lowbit_adam_cpu")
            _lib.lowbit_adam_step.restype = ctypes.c_int
            _lib.lowbit_adam_step.argtypes = [ctypes.POINTER(StepArgs)]
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


def codec_tables(name: str | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(decode map fp32, encode cell table int32, meta int32 [a_lo, a_hi, shift, ncells])`` of codebook
    ``name``; ``None`` (fp8): the e4m3 values of all 256 bit patterns and no encode table."""
    if name is None:
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


def _ptrs(ts: list[Tensor]):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def make_args(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    fmt: StateFormat | None,
    block_size: int,
    hyper: Tensor,
    seeds: list[int],
    maximize: bool,
    coupled: bool,
    stochastic: bool,
) -> tuple[StepArgs, list]:
    """The kernel's argument struct for one bucket, and the objects it points into (keep them alive)."""
    if fmt is None:
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        ms = vs = None
        mode = MODES["MODE_FP32"]
        cm = cv = (None, None, None)
    else:
        m = [s["exp_avg_codes"] for s in states]
        v = [s[f"{fmt.v_key}_codes"] for s in states]
        ms = _ptrs([s["exp_avg_scale"] for s in states])
        vs = None if fmt.v_rank1 else _ptrs([s[f"{fmt.v_key}_scale"] for s in states])
        mode = fmt.mode
        cm, cv = codec_tables(fmt.m_codebook), codec_tables(fmt.v_codebook)
    hyper = hyper.contiguous()
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    seeds_t = torch.tensor(seeds, dtype=torch.int64).to(torch.int32)  # low 32 bits
    flags = (
        (StepFlag.MAXIMIZE if maximize else 0)
        | (StepFlag.COUPLED if coupled else 0)
        | (StepFlag.STOCHASTIC_ROUND if stochastic else 0)
    )
    arrays = [_ptrs(params), _ptrs(grads), _ptrs(m), ms, _ptrs(v), vs]
    rank1 = fmt is not None and fmt.v_rank1
    cols = torch.tensor([p.shape[-1] if rank1 else 0 for p in params], dtype=torch.int64)
    rank1_arrays = (
        [_ptrs([s["exp_avg_sq_row"] for s in states]), _ptrs([s["exp_avg_sq_col"] for s in states])]
        if rank1
        else [None, None]
    )

    def ptr(t):
        return None if t is None else t.data_ptr()

    args = StepArgs(
        len(params),
        mode,
        1 if params[0].dtype == torch.bfloat16 else 0,
        block_size,
        *[ctypes.cast(a, _P) if a is not None else None for a in arrays],
        numels.data_ptr(),
        hyper.data_ptr(),
        seeds_t.data_ptr(),
        ptr(cm[0]),
        ptr(cv[0]),
        ptr(cm[1]),
        ptr(cv[1]),
        ptr(cm[2]),
        ptr(cv[2]),
        *[ctypes.cast(a, _P) if a is not None else None for a in rank1_arrays],
        cols.data_ptr(),
        int(flags),
        torch.get_num_threads(),
    )
    return args, [arrays, rank1_arrays, cols, numels, hyper, seeds_t, cm, cv]


def step(
    lib: ctypes.CDLL,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    fmt: StateFormat | None,
    block_size: int,
    hyper: Tensor,
    seeds: list[int],
    maximize: bool,
    coupled: bool,
    stochastic: bool,
) -> None:
    """Update ``params`` (same dtype, CPU, contiguous) and their states in one fused call.

    ``hyper``: fp32 ``[len(params), 9]`` rows (see ``_torch_step.HYPER_FIELDS``); ``fmt=None`` for
    fp32 states (then ``block_size`` is only the work granularity).
    """
    args, _keep = make_args(
        params, grads, states, fmt, block_size, hyper, seeds, maximize, coupled, stochastic
    )
    rc = lib.lowbit_adam_step(ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"lowbit.optim CPU kernel rejected its arguments (code {rc})")
