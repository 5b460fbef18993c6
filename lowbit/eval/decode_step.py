"""Decode steps compiled ahead of time (AOTInductor), one shared library per distinct decoder layer.

A regionally compiled layer (``torch.compile``) costs ~230 us of host time per call on a 2-core Zen 4:
dynamo's guards, its frame hook and AOTAutograd's runtime wrappers, ~7 ms of a 16 ms SmolLM2 decode step.
The decode step of a layer is always the same program on different tensors, so it is exported once
(``torch.export``, the layer's parameters and buffers as *inputs*), compiled by AOTInductor into one
shared library, and called for every layer through the library's C++ runner (~10 us a call): no guards,
no Python wrappers. Layers whose module structure and tensor metadata match share one library.

Torchao's weight tensor subclasses are passed as their inner plain tensors (``__tensor_flatten__``) and
rebuilt inside the exported program (``__tensor_unflatten__``), so the model itself is not changed. The
KV cache buffers are inputs too; the library updates them in place as the eager layer does.

:class:`AotDecodeLayer` replaces a layer's compiled call: decode steps (one position, static KV cache, no
autograd) go to the library for their input shapes, compiled on first use; everything else (prefill,
scoring, training) goes to the layer's ``torch.compile`` region.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger(__name__)

# Options that do not apply to an ahead-of-time library (it is C++ and its weights are inputs).
_NOT_AOT = ("cpp_wrapper", "freezing")


def _flatten(t: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """``(spec, plain tensors)`` of ``t``: itself, or a traceable subclass's inner tensors (recursively)."""
    if not is_traceable_wrapper_subclass(t):
        return None, [t]
    names, ctx = t.__tensor_flatten__()
    specs, leaves = [], []
    for name in names:
        spec, inner = _flatten(getattr(t, name))
        specs.append(spec)
        leaves += inner
    return (type(t), tuple(names), ctx, tuple(t.shape), t.stride(), tuple(specs)), leaves


def _unflatten(spec: object, leaves: Iterator[torch.Tensor]) -> torch.Tensor:
    if spec is None:
        return next(leaves)
    cls, names, ctx, shape, stride, specs = spec
    inner = {name: _unflatten(s, leaves) for name, s in zip(names, specs)}
    return cls.__tensor_unflatten__(inner, ctx, shape, stride)


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype)


class _Slots:
    """Where a module's parameters and buffers live (owner module, kind, attribute), read on every call:
    ``setup_caches`` replaces the KV cache buffers, so references taken once would go stale."""

    def __init__(self, module: nn.Module):
        self.names: list[str] = []
        self.slots: list[tuple[dict, str]] = []
        for prefix, owner in module.named_modules(remove_duplicate=False):
            for store in (owner._parameters, owner._buffers):
                for attr, t in store.items():
                    if t is not None:
                        self.names.append(f"{prefix}.{attr}" if prefix else attr)
                        self.slots.append((store, attr))

    def tensors(self) -> list[torch.Tensor]:
        return [store[attr] for store, attr in self.slots]


class AotDecodeLayer:
    """A torchtune decoder layer's call: decode steps through a shared AOTInductor library, the rest
    through ``fallback`` (the layer's ``torch.compile`` region).

    Args:
        layer: the decoder layer (its ``_compiled_call_impl`` is set to this object by :func:`install`).
        fallback: the callable used for anything that is not a decode step.
        libraries: ``{key: runner}`` shared by the layers of one model (key: structure + input metadata).
        options: Inductor options of the library.
    """

    def __init__(self, layer: nn.Module, fallback: Callable, libraries: dict, options: dict):
        self.layer, self.fallback, self.libraries = layer, fallback, libraries
        self.options = {k: v for k, v in options.items() if k not in _NOT_AOT}
        self.slots, self.cache, self.last = None, None, None
        # non-tensor state the exported program bakes in (head counts, eps, group sizes, module types)
        self.structure = tuple((name, type(m).__qualname__, m.extra_repr())
                               for name, m in layer.named_modules(remove_duplicate=False))

    def __call__(self, x, *args, mask=None, input_pos=None, **kwargs):
        # torchtune's decoder passes encoder_input / encoder_mask = None to self-attention layers
        if (args or any(v is not None for v in kwargs.values()) or torch.is_grad_enabled()
                or x.dim() != 3 or x.shape[1] != 1
                or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                or not isinstance(input_pos, torch.Tensor) or not self.layer.caches_are_enabled()):
            return self.fallback(x, *args, mask=mask, input_pos=input_pos, **kwargs)
        cache = getattr(getattr(self.layer, "attn", None), "kv_cache", None)
        if cache is not self.cache:  # setup_caches made new cache buffers: find the tensors again
            self.slots, self.cache, self.last = _Slots(self.layer), cache, None
        tensors = self.slots.tensors()
        inputs = [x, mask, input_pos]
        meta = (x.shape, x.dtype, mask.shape, input_pos.shape, input_pos.dtype)
        last = self.last  # fast path: same tensors and input shapes as the previous call
        if last is None or last[0] != meta or any(a is not b for a, b in zip(last[1], tensors)):
            last = self.last = (meta, tensors, *self._library(inputs, tensors))
        _, _, library, leaves = last
        if library is False:  # export failed once for this key: stay on the compiled region
            return self.fallback(x, mask=mask, input_pos=input_pos)
        return library.run(inputs + leaves)[0]

    def _library(self, inputs: list[torch.Tensor], tensors: list[torch.Tensor]) -> tuple[object, list]:
        """The library for these inputs and tensors (compiled if new) and the tensors' plain leaves."""
        specs, leaves = [], []
        for t in tensors:
            spec, inner = _flatten(t)
            specs.append(spec)
            leaves += inner
        key = (self.structure, repr(specs), tuple(_meta(t) for t in inputs + leaves))  # ctx: dicts, lists
        library = self.libraries.get(key)
        if library is None:
            library = self.libraries[key] = self._compile(specs, inputs, leaves)
        return library, leaves

    def _compile(self, specs: list, inputs: list[torch.Tensor], leaves: list[torch.Tensor]):
        layer, names = self.layer, self.slots.names

        class DecodeStep(nn.Module):
            def forward(self, x, mask, input_pos, *leaves):
                it = iter(leaves)
                tensors = {name: _unflatten(spec, it) for name, spec in zip(names, specs)}
                kwargs = {"mask": mask, "input_pos": input_pos}
                return torch.func.functional_call(layer, tensors, (x,), kwargs)

        compiled_call, layer._compiled_call_impl = layer._compiled_call_impl, None  # trace the eager layer
        try:  # export traces on fake tensors: the KV caches are not touched
            with warnings.catch_warnings():  # functional_call's swap-and-restore, reported as a side effect
                warnings.filterwarnings("ignore", message=".*side effects happened")
                program = torch.export.export(DecodeStep(), tuple(inputs + leaves), strict=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = torch._inductor.aoti_compile_and_package(
                    program, package_path=os.path.join(tmp, "decode_step.pt2"), inductor_configs=self.options)
                package = torch._inductor.aoti_load_package(path)
        except Exception as e:  # noqa: BLE001 - any export / compile failure: keep the compiled region
            log.warning("decode step of %s not compiled ahead of time (%s: %s); using torch.compile",
                        type(layer).__name__, type(e).__name__, e)
            return False
        finally:
            layer._compiled_call_impl = compiled_call
        # the C++ runner itself: the Python wrapper around it re-flattens its inputs (~15 us a call)
        return package.loader


def install(layer: nn.Module, fallback: Callable, libraries: dict, options: dict) -> None:
    """Route ``layer``'s calls through :class:`AotDecodeLayer` (decode) and ``fallback`` (the rest)."""
    layer._compiled_call_impl = AotDecodeLayer(layer, fallback, libraries, options)
