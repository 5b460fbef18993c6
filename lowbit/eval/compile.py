"""``torch.compile`` for CPU inference with the Xeon Inductor flags, scoped to the compiled model.

The flags (``cpp_wrapper``, ``max_autotune``, ``cpp.enable_concat_linear``, ``cpp.use_small_dequant_buffer``,
``freezing``) are passed as ``torch.compile(..., options=...)``: Inductor applies them as a
``config.patch`` inside every (re)compilation of this model only, so the global
``torch._inductor.config`` is never changed and other compiled code is unaffected.

Tensor-subclass overhead: torchao's quantized weights are tensor subclasses whose Python dispatch costs
host time on every call. ``compile_for_cpu`` unwraps them into plain-tensor parametrizations
(``torchao.utils.unwrap_tensor_subclass``), so the traced graph sees plain tensors and the dequant /
kernel calls, and ``freezing`` then folds the weights into the graph as constants.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch
from torch import nn

CPU_INDUCTOR_FLAGS: dict[str, object] = {
    "cpp_wrapper": True,
    "max_autotune": True,
    "cpp.enable_concat_linear": True,
    "cpp.use_small_dequant_buffer": True,
    "freezing": True,
}


class CompilerNotFoundError(RuntimeError):
    """No working C++ compiler for Inductor's CPU backend."""


def find_cpp_compiler() -> str:
    """Path of the C++ compiler Inductor will use (``$CXX`` if set, else Inductor's search).

    Raises:
        CompilerNotFoundError: none found or it does not run; the message suggests running without
            ``--compile``.
    """
    hint = ("torch.compile on CPU needs a C++ compiler (g++ or clang++; set $CXX to choose one). "
            "Install one, or run without --compile (eager mode).")
    cxx = os.environ.get("CXX")
    if cxx:
        path = shutil.which(cxx)
        if path is None:
            raise CompilerNotFoundError(f"$CXX={cxx!r} is not an executable. {hint}")
    else:
        from torch._inductor import cpp_builder

        try:
            path = shutil.which(cpp_builder.get_cpp_compiler())
        except Exception as e:  # Inductor raises InvalidCxxCompiler (and others) when none is found
            raise CompilerNotFoundError(f"no C++ compiler found ({e}). {hint}") from e
        if path is None:
            raise CompilerNotFoundError(f"no C++ compiler found. {hint}")
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise CompilerNotFoundError(f"C++ compiler {path!r} does not run ({e}). {hint}") from e
    return path


RECOMPILE_LIMIT = 64


def compile_for_cpu(
    model: nn.Module, *, dynamic: bool = False, unwrap: bool = True, flags: dict | None = None
) -> nn.Module:
    """Compile ``model`` for CPU inference; returns the compiled module (an ``OptimizedModule``).

    Compilation is lazy (first call) and needs ``torch.no_grad()`` / ``torch.inference_mode()`` for
    ``freezing`` to apply. With freezing, later in-place changes to the weights are NOT seen by the
    compiled model: quantize and load weights first.

    Args:
        model: an eager model on CPU, possibly quantized by ``quantize_for_inference``. Its torchao
            weight subclasses are unwrapped in place (``unwrap=False`` to skip).
        dynamic: compile for dynamic shapes (one graph for all prompt lengths) instead of static.
        unwrap: unwrap torchao tensor subclasses into plain-tensor parametrizations.
        flags: Inductor options overriding :data:`CPU_INDUCTOR_FLAGS`.

    Raises:
        CompilerNotFoundError: no C++ compiler (run without ``--compile``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise ValueError(f"compile_for_cpu compiles for CPU; parameter {name!r} is on {p.device}")
    find_cpp_compiler()
    options = {**CPU_INDUCTOR_FLAGS, **(flags or {})}
    unknown = sorted(k for k in options if not _is_inductor_option(k))
    if unknown:
        raise ValueError(f"unknown Inductor option(s) in flags: {unknown}")
    if unwrap:
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)
    # Every compiled model adds guarded entries (one per model instance and input shape: prefill,
    # decode, lm-eval batch widths) to the *same* code object, torchtune's TransformerDecoder.forward.
    # With a few models in one process dynamo's default limit of 8 is exhausted and it silently runs
    # the forward eagerly (seen comparing 8w / 4w / 8da4w in one benchmark). Raise it, never lower it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=dynamic, options=options)


def _is_inductor_option(key: str) -> bool:
    import torch._inductor.config as inductor_config

    obj = inductor_config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
