"""Which step implementation updates a bucket of parameters: C++ on CPU, Triton on CUDA, torch otherwise.

``LOWBIT_OPTIM_BACKEND`` (read at every step) picks one:

- ``auto`` (default): the fused C++ kernel for fp32 / bf16 CPU tensors, the fused Triton kernel for CUDA
  tensors, the pure-torch step for anything else (other devices, fp16 on CPU, non-contiguous tensors).
  When the C++ kernel cannot be built or Triton is not installed, the torch step runs instead and a
  ``RuntimeWarning`` says so once per process.
- ``cpp``, ``triton``, ``torch``: that implementation for every parameter, or a ``ValueError`` naming the
  parameter it cannot update. ``triton`` on CPU tensors runs the kernels in Triton's interpreter (numpy):
  slow, and bit-identical to the compiled kernels (see ``lowbit.optim._triton_step``), which is how the
  tests prove the GPU kernels exact on a machine without a GPU.

All three compute the same bits (tests/optim/test_step_exact.py, tests/optim/test_triton_step.py).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import _cpu_kernel

BACKENDS = ("auto", "cpp", "triton", "torch")
ENV = "LOWBIT_OPTIM_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_warned: set[str] = set()
_triton_error: str | None = None
_triton_checked = False


def requested() -> str:
    """The value of ``LOWBIT_OPTIM_BACKEND`` (``auto`` when unset); ``ValueError`` for an unknown one."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV}={os.environ.get(ENV)!r} is not a backend; valid values: {', '.join(BACKENDS)}"
        )
    return value


def triton_available() -> bool:
    """Whether ``triton`` imports (checked once)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # not installed, or a broken install
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton_error is None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _triton_supports(p: Tensor, g: Tensor) -> str | None:
    """Why the Triton kernel cannot update ``p`` with ``g`` (``None`` if it can)."""
    if p.dtype not in TRITON_DTYPES:
        return f"dtype {p.dtype} (supported: float32, bfloat16, float16)"
    if g.dtype != p.dtype:
        return f"gradient dtype {g.dtype} != parameter dtype {p.dtype}"
    if not (p.is_contiguous() and g.is_contiguous()):
        return "a non-contiguous parameter or gradient"
    if g.device != p.device:
        return f"gradient on {g.device}, parameter on {p.device}"
    if p.device.type not in ("cuda", "cpu"):
        return f"device {p.device}"
    return None


def choose(p: Tensor, g: Tensor, where: str) -> str:
    """``"cpp"``, ``"triton"`` or ``"torch"`` for parameter ``p`` (``where`` in errors), gradient ``g``."""
    want = requested()
    if want == "torch":
        return "torch"
    if want == "cpp":
        if not _cpu_kernel.supports(p, g):
            raise ValueError(
                f"{ENV}=cpp: the C++ kernel cannot update {where} ({p.dtype} on {p.device}; it takes "
                "contiguous float32 / bfloat16 CPU tensors)"
            )
        if _cpu_kernel.get() is None:
            raise ValueError(f"{ENV}=cpp: the C++ kernel could not be built ({_cpu_kernel.failure()})")
        return "cpp"
    if want == "triton":
        if not triton_available():
            raise ValueError(
                f"{ENV}=triton: triton is not importable ({_triton_error}); "
                "install it with `pip install triton`"
            )
        why = _triton_supports(p, g)
        if why is not None:
            raise ValueError(f"{ENV}=triton: the Triton kernel cannot update {where}: {why}")
        return "triton"
    # auto
    if p.device.type == "cpu":
        if _cpu_kernel.supports(p, g) and _cpu_kernel.get() is not None:
            return "cpp"
        return "torch"
    if p.device.type == "cuda":
        if not triton_available():
            _warn_once(
                "triton",
                "lowbit.optim: Triton is not importable "
                f"({_triton_error}); CUDA parameters use the pure-torch step, which launches about "
                "twenty kernels per parameter. Install it with `pip install triton`.",
            )
            return "torch"
        if _triton_supports(p, g) is None:
            return "triton"
    return "torch"
