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
~15-20 ms/token. The final norm and output head are a second small compiled region; the embedding
lookup runs eagerly. Decode steps of the layers do not go through the region: each layer's call is
replaced by :class:`lowbit.eval.decode_step.AotDecodeLayer`, which exports the decode step once and
runs it as an AOTInductor library shared by the layers (no per-call guards or wrappers); prefill,
scoring and anything with autograd stay on the region.
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
weights' tensor-subclass types) are what tells a 4w layer from an 8w one. They are kept; decode steps
skip them by running the ahead-of-time library instead, whose libraries are per model and keyed by the
layer's module structure, subclass types and tensor metadata.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch
from torch import nn

from lowbit.eval import decode_step

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
    compiled model: quantize and load weights first. The compiled layers and head are bound to this
    model's modules: deep-copy (or deploy) a model before compiling it, not after.

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
        libraries: dict = {}  # the decode-step libraries, shared by this model's layers
        for layer in model.layers:
            attn = getattr(layer, "attn", None)
            if attn is not None and hasattr(attn, "_attention_call"):
                attn._attention_call = _fused_decode_attention(attn._attention_call)
            layer.compile(dynamic=dynamic, options=options)
            if hasattr(layer, "caches_are_enabled"):
                decode_step.install(layer, layer._compiled_call_impl, libraries, options)
        head = _head_weight_owner(model)
        if head is not None:  # an instance attribute shadows TransformerDecoder.unembed
            object.__setattr__(model, "unembed", torch.compile(
                _fused_decode_unembed(model.norm, head), dynamic=dynamic, options=options))
        return model
    from torchao.utils import unwrap_tensor_subclass

    unwrap_tensor_subclass(model)
    return torch.compile(model, dynamic=dynamic, options=options)


def _fused_decode_attention(sdpa):
    """torchtune's attention call, with one-query (decode) steps written as plain reductions.

    For a single query position ATen's CPU flash-attention kernel is almost all overhead (~100 us per
    call, 3 ms of a SmolLM2 decode step); the same math as broadcast multiply + sum + softmax in fp32 is
    fused by Inductor into a few C++ loops. Longer queries (prefill, scoring) keep ``sdpa``.
    """

    def attention(q, k, v, mask, dropout_p, is_causal):
        if q.shape[-2] != 1 or dropout_p or is_causal or not (mask is None or mask.dtype == torch.bool):
            return sdpa(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        # q (B, H, 1, D), k / v (B, H, L, D), mask (B, 1, L) bool: True = may attend
        scores = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # (B, H, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return (probs.unsqueeze(-1) * v.float()).sum(-2, keepdim=True).to(q.dtype)  # (B, H, 1, D)

    return attention


def _head_weight_owner(model: nn.Module) -> nn.Module | None:
    """The module holding the output head's weight when it is a plain float matrix without bias (a
    tied head's embedding, or an unquantized ``nn.Linear``); None otherwise (the head stays as it is)."""
    out = getattr(model, "output", None)
    owner = getattr(out, "tied_module", out)
    w = getattr(owner, "weight", None)
    if (getattr(model, "num_output_chunks", 0) or not isinstance(owner, nn.Module)
            or type(w) not in (torch.Tensor, nn.Parameter) or not w.is_floating_point()
            or getattr(out, "bias", None) is not None):
        return None
    return owner


def _fused_decode_unembed(norm: nn.Module, owner: nn.Module):
    """``TransformerDecoder.unembed`` (final norm, head, fp32 logits), with one-position (decode) steps'
    head written as a broadcast multiply + sum in fp32, rounded to the model's dtype as the matmul is.

    ATen's bf16 matmul reads SmolLM2's 49152 x 576 tied head at ~15 GB/s for one row (3.8 ms a token);
    Inductor's fused reduction over the same bytes takes ~2 ms. Longer inputs keep the matmul.
    """

    def unembed(h):  # h (B, S, D) -> logits (B, S, V) fp32
        h = norm(h)
        w = owner.weight  # (V, D)
        if h.shape[-2] != 1:
            return nn.functional.linear(h, w).float()
        return (h.float().unsqueeze(-2) * w.float()).sum(-1).to(h.dtype).float()

    return unembed


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
