"""``torch.compile`` for CPU inference with the Xeon Inductor flags, scoped to the compiled model.

The flags (``cpp_wrapper``, ``max_autotune``, ``cpp.enable_concat_linear``, ``cpp.use_small_dequant_buffer``,
``freezing``) are passed as ``torch.compile(..., options=...)``: Inductor applies them as a
``config.patch`` inside every (re)compilation of this model only, so the global
``torch._inductor.config`` is never changed and other compiled code is unaffected.

Regional compilation: a torchtune ``TransformerDecoder`` is not compiled as one graph. Its decoder
layers are compiled in place (``layer.compile``); they share one code object and their weights are graph
inputs, so Inductor compiles one graph per input shape and all 30 layers of SmolLM2 reuse it. Measured on
SmolLM2-135M 8da4w, 2 cores (EPYC Zen 4): the whole-model graph took 5.4 min to compile per shape (most of
it g++ on one generated file) and decoded at 24 ms/token; the regional one compiles in ~25 s and decodes at
~15-20 ms/token. The embedding lookup, final norm and the output head run eagerly (three ops per token).
Weights are inputs of the layer graph, so ``freezing`` folds nothing there. torchao's quantized weights
stay tensor subclasses, which dynamo traces into their dequant / kernel calls (their Python dispatch
runs at trace time only). Unwrapping them into parametrizations instead would give every layer its own
``Parametrized*`` class and so its own compile (30 per shape).

Any other module is compiled whole, with its torchao subclasses unwrapped into plain-tensor
parametrizations (``torchao.utils.unwrap_tensor_subclass``) so that ``freezing`` folds them as constants.

Guards: dynamo re-checks a compiled layer's guards on every call (~60 us per layer and token measured,
~1.9 ms of a 20 ms SmolLM2 decode step). Skipping the guards on torch's built-in modules
(``skip_guard_on_inbuilt_nn_modules_unsafe``) saved a third of that but is wrong as soon as two deployed
models share the process: the layers share one code object, and the guards it drops (on ``nn.Linear``
weights' tensor-subclass types) are what tells a 4w layer from an 8w one. They are kept.
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
    model: nn.Module, *, dynamic: bool = False, flags: dict | None = None
) -> nn.Module:
    """Compile ``model`` for CPU inference and return it.

    A torchtune ``TransformerDecoder`` (a module with ``layers`` and ``setup_caches``) has its decoder
    layers compiled in place (regional compilation, one graph shared by every layer) and is returned
    itself; any other module is compiled whole and its ``OptimizedModule`` wrapper is returned.

    Compilation is lazy (first call) and needs ``torch.no_grad()`` / ``torch.inference_mode()`` for
    ``freezing`` to apply. With freezing, later in-place changes to the weights are NOT seen by the
    compiled model: quantize and load weights first.

    Args:
        model: an eager model on CPU, possibly deployed by :func:`lowbit.eval.deploy`.
        dynamic: compile for dynamic shapes (one graph for all prompt lengths) instead of static.
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
    # Every compiled model adds guarded entries (one per model instance and input shape: prefill,
    # decode, lm-eval batch widths) to the *same* code object, torchtune's decoder layer forward.
    # With a few models in one process dynamo's default limit of 8 is exhausted and it silently runs
    # the forward eagerly (seen comparing 8w / 4w / 8da4w in one benchmark). Raise it, never lower it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if _is_decoder(model):
        for layer in model.layers:
            layer.compile(dynamic=dynamic, options=options)
        return model
    from torchao.utils import unwrap_tensor_subclass

    unwrap_tensor_subclass(model)
    return torch.compile(model, dynamic=dynamic, options=options)


def _is_decoder(model: nn.Module) -> bool:
    return isinstance(getattr(model, "layers", None), nn.ModuleList) and hasattr(model, "setup_caches")


def _is_inductor_option(key: str) -> bool:
    import torch._inductor.config as inductor_config

    obj = inductor_config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
