"""``deploy``: the one path from a float or QAT checkpoint model to the CPU model that is run.

``lowbit eval`` (:func:`~lowbit.eval.evaluate.prepare_for_inference`), ``lowbit bench``,
:func:`~lowbit.eval.quantize.quantize_for_inference` and the hand-off checks all call :func:`deploy`. It
selects the layers exactly as QAT does (``qat.prepare``) and quantizes them exactly as a QAT model is
converted (``qat.convert``, whose ``lowbit.qat.inference.apply_inference_quant`` is the one place where
weights become inference tensors), so a QAT model converted in memory and its checkpoint deployed by
``lowbit eval`` are the same model.

What it honours (from a checkpoint's ``lowbit.json`` or the arguments):

- the scheme (``qat_scheme``) and its torchao ``quantize_`` config;
- the group size (``qat_group_size``); when none is recorded or given, the largest group size the
  scheme's kernel supports (not above the scheme's default) that divides every linear's
  ``in_features`` (:func:`pick_group_size`): SmolLM2's widths 576 / 1536 get 64 for ``4w``;
- quantized embeddings (``qat_embeddings``): untied ``nn.Embedding`` weights too;
- learned ranges (``qat_qparams``, the checkpoint's ``qparams.safetensors``): loaded into the prepared
  layers (``qat.load_learned_qparams``), which ``qat.convert`` writes into the inference weights;
- the kernel dtype: ``4w`` / ``8w`` / ``8da4w`` cast to bf16 (only their bf16 CPU kernels are
  vectorized) unless ``dtype`` says otherwise; ``8da4w`` in bf16 runs on the tinygemm int4 kernel.

A float model most of whose linears the scheme cannot take fails (naming a layer) instead of being
deployed mostly float under a quantized scheme's name. The ggml schemes (``q4_0`` / ``q8_0``) have no
torch kernel: they stay their exact simulation of llama.cpp's numbers (deploy them to llama.cpp with
``lowbit export --to gguf``). The result carries ``model.lowbit_deployment`` (:class:`Deployment`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("lowbit.eval.deploy")

INFERENCE_SCHEMES: tuple[str, ...] = ("none", "8w", "8da8w", "4w", "8da4w", "8da3w", "8da2w", "3w", "2w",
                                      "q4_0", "q8_0")

# Activation dtype of the fast CPU kernel behind each scheme (None: keep the model's dtype).
KERNEL_DTYPE: dict[str, torch.dtype | None] = {
    "none": None, "8da8w": None, "8w": torch.bfloat16, "4w": torch.bfloat16, "8da4w": torch.bfloat16,
    "8da3w": torch.bfloat16, "8da2w": torch.bfloat16, "3w": None, "2w": None, "q4_0": None, "q8_0": None,
}
# Schemes whose int8-activation / int2..int4-weight layers run on the tinygemm int4 kernel in bf16.
INT4PACK_SCHEMES = ("8da4w", "8da3w", "8da2w")
DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class Deployment:
    """What :func:`deploy` did (``model.lowbit_deployment``): for labels and checks."""

    scheme: str  # "none" or str(Scheme), e.g. "4w(group_size=64)"
    dtype: torch.dtype
    quantized_linears: list[str] = field(default_factory=list)
    float_linears: list[str] = field(default_factory=list)
    quantized_embeddings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``scheme``, plus ``[q/n linears]`` when some linears stayed float."""
        if not self.float_linears or self.scheme == "none":
            return self.scheme
        n = len(self.quantized_linears) + len(self.float_linears)
        return f"{self.scheme} [{len(self.quantized_linears)}/{n} linears]"


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


def pick_group_size(model: nn.Module, name: str) -> int | None:
    """The group size :func:`deploy` uses for scheme ``name`` when none is recorded or given.

    The largest group size the scheme's kernel supports, not above the scheme's default, that divides
    the ``in_features`` of every ``nn.Linear`` of ``model``; if none divides them all, the one that fits
    the most layers (deploy then checks that most linears are quantized). None for per-channel schemes.
    """
    from lowbit.qat.schemes import group_size_candidates

    candidates = group_size_candidates(name)
    if not candidates:
        return None
    widths = [m.in_features for _, m in _linears(model)]
    return max(candidates, key=lambda g: (sum(w % g == 0 for w in widths), g))


def _resolve(model: nn.Module, spec, group_size: int | None, embeddings: bool | None, qparams):
    """``(Scheme or None, embeddings, learned qparams or None)`` from deploy's arguments."""
    from lowbit.qat import Scheme, get_prepared_scheme, get_scheme

    if isinstance(spec, dict):  # a checkpoint's lowbit.json
        recorded = spec.get("qat_group_size")
        if qparams is None and group_size in (None, recorded):
            qparams = spec.get("qat_qparams")  # learned for the recorded group size only
        if group_size is None:
            group_size = recorded
        if embeddings is None:
            embeddings = bool(spec.get("qat_embeddings") or False)
        spec = spec.get("qat_scheme")
    prepared = get_prepared_scheme(model)
    if prepared is not None:
        name = spec.name if isinstance(spec, Scheme) else spec
        if name not in (None, prepared.name) or group_size not in (None, prepared.group_size):
            raise ValueError(f"deploy: the model is prepared with {prepared}; cannot deploy it as "
                             f"{name!r} with group_size={group_size!r}")
        return prepared, False, qparams
    if isinstance(spec, Scheme):
        if group_size not in (None, spec.group_size):
            raise ValueError(f"group_size={group_size} conflicts with scheme {spec}")
        return spec, bool(embeddings), qparams
    if spec is None or spec == "none":
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} given but scheme is {spec!r} (no quantization)")
        return None, False, None
    if not isinstance(spec, str) or spec not in INFERENCE_SCHEMES:
        raise ValueError(f"unknown inference scheme {spec!r}; expected one of {list(INFERENCE_SCHEMES)}")
    if group_size is None:
        group_size = pick_group_size(model, spec)
    return get_scheme(spec, group_size), bool(embeddings), qparams


@torch.no_grad()
def deploy(model: nn.Module, spec=None, *, group_size: int | None = None, embeddings: bool | None = None,
           dtype: torch.dtype | None = None, qparams: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Quantize ``model`` in place for CPU inference and return it.

    Args:
        model: a float model on CPU (fp32 or bf16), or one prepared with ``lowbit.qat.prepare`` (then
            ``spec`` may be None: its prepared layers are deployed with its scheme).
        spec: None / ``"none"`` (float), a scheme name (``"8w"``, ``"8da8w"``, ``"4w"``, ``"8da4w"``,
            ``"q4_0"``, ``"q8_0"``), a :class:`~lowbit.qat.Scheme`, or a checkpoint's metadata dict
            (``qat_scheme``, ``qat_group_size``, ``qat_embeddings``; no ``qat_scheme``: float).
        group_size: overrides the recorded group size; default: recorded, else :func:`pick_group_size`.
        embeddings: also quantize untied embeddings (default: ``qat_embeddings`` of a metadata ``spec``).
        qparams: learned QAT qparams (``{"<layer>.weight_scale": ..., "<layer>.weight_zero": ...}``;
            default: a metadata ``spec``'s ``qat_qparams`` when its recorded group size is used).
        dtype: ``torch.float32`` or ``torch.bfloat16`` for the float parts and activations. Default: bf16
            for ``4w`` / ``8w`` / ``8da4w``, else the model's dtype. fp32 reproduces fp32 fake quant.

    Returns:
        ``model``, quantized (``qat.convert``), with ``model.lowbit_deployment`` (:class:`Deployment`).

    Raises:
        ValueError: unknown scheme, bad group size / dtype, a parameter not on CPU, embeddings tied to
            the output head, or most linears of a float model not fitting the scheme (names a layer).
    """
    from lowbit import qat
    from lowbit.qat.inference import float_dtype, swap_8da4w_to_int4pack

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise ValueError(f"deploy is for CPU inference; parameter {name!r} is on {p.device}")
    scheme, emb, qparams = _resolve(model, spec, group_size, embeddings, qparams)
    target = dtype or KERNEL_DTYPE[scheme.name if scheme else "none"] or float_dtype(model)
    if target not in DTYPES:
        raise ValueError(f"model dtype {target} not supported; pass dtype=torch.float32 or torch.bfloat16")
    if scheme is None:
        model.to(target)
        model.lowbit_deployment = Deployment("none", target, float_linears=[n for n, _ in _linears(model)])
        return model
    if qparams and qat.fake_quant_modules(model):
        raise ValueError("deploy: qparams given for a model that is already prepared (it has its own)")
    if not qat.fake_quant_modules(model):
        qat.prepare(model, scheme, embeddings=emb)
        mods = qat.fake_quant_modules(model)
        n_quant = sum(not isinstance(m, qat.FakeQuantEmbedding) for m in mods.values())
        floats = _linears(model)
        if len(floats) > n_quant:
            qat.unprepare(model)
            fqn, lin = floats[0]
            raise ValueError(
                f"scheme {scheme}: {len(floats)} of {len(floats) + n_quant} linear layers would stay float "
                f"(e.g. {fqn!r}, in_features {lin.in_features}, out_features {lin.out_features}); pass a "
                f"group size that divides the model's widths")
        if qparams:
            qat.load_learned_qparams(model, qparams)
    mods = qat.fake_quant_modules(model)
    lin = [n for n, m in mods.items() if not isinstance(m, qat.FakeQuantEmbedding)]
    embs = [n for n, m in mods.items() if isinstance(m, qat.FakeQuantEmbedding)]
    qat.convert(model, dtype=target)
    if scheme.name in INT4PACK_SCHEMES and target == torch.bfloat16:
        swap_8da4w_to_int4pack(model)  # the fast kernel; convert keeps torchao's bit-exact reference path
    done = set(lin)
    floats = [n for n, _ in _linears(model) if n not in done]
    if floats:
        log.info("scheme %s: %d linear layer(s) kept in float: %s", scheme, len(floats), floats)
    model.lowbit_deployment = Deployment(str(scheme), target, lin, floats, embs)
    return model


def as_is(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` unchanged but for an optional ``dtype`` cast, with a :class:`Deployment` describing it
    (kept if it was deployed already; ``"<scheme> (fake quant)"`` for a prepared QAT model)."""
    from lowbit import qat
    from lowbit.qat.inference import float_dtype

    if dtype is not None:
        model = model.to(dtype)
    if deployment_of(model) is None:
        prepared = qat.get_prepared_scheme(model)
        name = "none" if prepared is None else f"{prepared} (fake quant)"
        model.lowbit_deployment = Deployment(name, float_dtype(model), float_linears=[
            n for n, _ in _linears(model)])
    return model


def deployment_of(model: nn.Module) -> Deployment | None:
    """The :class:`Deployment` of a deployed model (or of the model inside a compiled wrapper)."""
    return getattr(getattr(model, "_orig_mod", model), "lowbit_deployment", None)
