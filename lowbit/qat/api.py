"""prepare / convert / enable_fake_quant: the QAT workflow on a whole model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from lowbit.qat.modules import (
    QPARAM_NAMES,
    RANGE_INITS,
    FakeQuantEmbedding,
    FakeQuantLinear,
    FakeQuantLoRALinear,
    _lora_cls,
)
from lowbit.qat.schemes import GGML_SCHEMES, Scheme, get_scheme
from lowbit.quant.affine import quantize, quantize_tinygemm

logger = logging.getLogger("lowbit.qat")

_FAKE_QUANT_TYPES = (FakeQuantLinear, FakeQuantEmbedding, FakeQuantLoRALinear)

FilterFn = Callable[[nn.Module, str], bool]


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, name, new)


def fake_quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{fqn: module}`` of every fake-quant module in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _FAKE_QUANT_TYPES)}


def _tied_embedding_names(model: nn.Module, emb_fqns: list[str]) -> list[str]:
    """Embeddings whose weight Parameter is also used by another module (e.g. a tied output head)."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    tied = []
    for fqn in emb_fqns:
        w = model.get_submodule(fqn).weight
        if len(owners.get(id(w), [])) > 1:
            tied.append(fqn)
    # torchtune's TiedLinear (a plain object, not a Module) holds the embedding module itself
    for _, mod in model.named_modules():
        for attr in vars(mod).values():
            tied_mod = getattr(attr, "tied_module", None)
            for fqn in emb_fqns:
                if tied_mod is not None and tied_mod is model.get_submodule(fqn) and fqn not in tied:
                    tied.append(fqn)
    return tied


def prepare(
    model: nn.Module,
    scheme: str | Scheme,
    *,
    group_size: int | None = None,
    filter_fn: FilterFn | None = None,
    embeddings: bool = False,
    learn_ranges: bool = False,
    ranges_init: str = "minmax",
) -> nn.Module:
    """Swap ``nn.Linear`` (and torchtune ``LoRALinear``) for fake-quant modules, in place.

    Args:
        model: any module tree; may live on the meta device (parameters are shared, never copied).
        scheme: ``"8da4w" | "4w" | "8w" | "8da8w"`` or a :class:`Scheme`.
        group_size: weight group size for the per-group schemes (see :func:`get_scheme`).
        filter_fn: ``(module, fqn) -> bool``; only modules for which it returns True are swapped.
        embeddings: also fake-quantize ``nn.Embedding`` weights (weight-only, ``scheme.embedding_config()``).
        learn_ranges: give every prepared linear trainable per-group weight qparams (``weight_scale``,
            and ``weight_zero`` for ``4w``), initialised from the weight's min / max, trained with LSQ
            gradients; ``convert`` writes them into the inference weights. Embeddings keep min / max
            qparams.
        ranges_init: where learned ranges start: ``"minmax"`` (the PTQ qparams) or ``"mse"`` (per group,
            the shrunk range with the least weight quantization error); see
            :meth:`FakeQuantLinear.learn_ranges`.

    Layers whose shape the scheme's kernel cannot take (``scheme.fits`` is False, e.g. ``in_features``
    not divisible by ``group_size``) stay float; they are listed in one log line, and ``convert`` leaves
    them float too. Returns ``model``.

    Raises:
        ValueError: unknown scheme / bad group size; model already prepared; ``embeddings=True`` on a
            model whose embedding weight is tied to another layer (not supported: the tied head would
            be quantized as a linear by inference but as an embedding here); ``learn_ranges=True`` with a
            per-channel scheme (``8w``, ``8da8w``: no groups).
    """
    if isinstance(scheme, Scheme):
        if group_size is not None and group_size != scheme.group_size:
            raise ValueError(f"group_size={group_size} conflicts with scheme {scheme}")
    else:
        scheme = get_scheme(scheme, group_size)
    if learn_ranges and scheme.name in GGML_SCHEMES:
        raise ValueError(f"prepare(learn_ranges=True): scheme {scheme.name!r} is llama.cpp's format, whose "
                         "scale rule is fixed (llama.cpp recomputes nothing from a learned scale)")
    if ranges_init not in RANGE_INITS:
        raise ValueError(f"prepare: unknown ranges_init {ranges_init!r}; choose one of "
                         f"{', '.join(RANGE_INITS)}")
    if learn_ranges and scheme.group_size is None:
        raise ValueError(f"prepare(learn_ranges=True): scheme {scheme.name!r} has no weight groups (one "
                         "scale per output channel); learned ranges are for the per-group schemes "
                         "8da4w, 4w, 8da3w, 8da2w, 3w, 2w")
    already = fake_quant_modules(model)
    if already:
        first = next(iter(already.values()))
        raise ValueError(
            f"prepare: model is already prepared for QAT (scheme {first.scheme}, e.g. layer "
            f"{next(iter(already))!r}); prepare may be called only once"
        )
    lora_cls = _lora_cls()
    keep = filter_fn or (lambda m, fqn: True)

    linears: list[tuple[str, nn.Module]] = []
    emb_fqns: list[str] = []
    skipped: list[str] = []
    lora_children: set[str] = set()
    for fqn, mod in model.named_modules():
        if any(fqn.startswith(p + ".") for p in lora_children):
            continue  # adapters of a LoRALinear are handled through its merged weight
        if isinstance(mod, lora_cls):
            lora_children.add(fqn)
            if not keep(mod, fqn):
                continue
            extras = (not isinstance(mod.dropout, nn.Identity) or getattr(mod, "_quantize_base", False)
                      or hasattr(mod, "magnitude"))
            if extras:
                raise ValueError(
                    f"prepare: LoRA layer {fqn!r} has adapter dropout, an NF4 base or DoRA; QAT "
                    "fake-quantizes the merged weight W + (alpha/r) B A and needs lora_dropout=0, "
                    "a float base, no DoRA"
                )
            if scheme.fits(nn.Linear(mod.in_dim, mod.out_dim, device="meta")):
                linears.append((fqn, mod))
            else:
                skipped.append(fqn)
        elif type(mod) is nn.Linear and keep(mod, fqn):
            if scheme.fits(mod):
                linears.append((fqn, mod))
            else:
                skipped.append(fqn)
        elif embeddings and type(mod) is nn.Embedding and keep(mod, fqn):
            if scheme.fits_embedding(mod):
                emb_fqns.append(fqn)
            else:
                skipped.append(fqn)

    if emb_fqns:
        tied = _tied_embedding_names(model, emb_fqns)
        if tied:
            raise ValueError(
                f"prepare(embeddings=True): embedding(s) {tied} share their weight with another layer "
                "(tied word embeddings); fake-quantizing tied embeddings is not supported. Use "
                "embeddings=False, or untie the output head first"
            )

    for fqn, mod in linears:
        new = FakeQuantLoRALinear(mod, scheme) if isinstance(mod, lora_cls) else FakeQuantLinear.from_linear(
            mod, scheme
        )
        if learn_ranges and not new.weight.is_meta:
            new.learn_ranges(ranges_init)
        _set_child(model, fqn, new)
    for fqn in emb_fqns:
        _set_child(model, fqn, FakeQuantEmbedding.from_embedding(model.get_submodule(fqn), scheme))

    if skipped:
        logger.warning(
            "lowbit.qat.prepare(%s): %d layer(s) kept in float because their shape does not fit the "
            "scheme: %s", scheme, len(skipped), ", ".join(skipped)
        )
    if not linears and not emb_fqns:
        logger.warning("lowbit.qat.prepare(%s): no layer was prepared", scheme)
    return model


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch fake quant on / off in every prepared module (off = plain float forward)."""
    mods = fake_quant_modules(model)
    if not mods:
        raise ValueError("enable_fake_quant: model has no fake-quant modules; call lowbit.qat.prepare first")
    for m in mods.values():
        m.fake_quant_enabled = bool(enabled)
    return model


def get_prepared_scheme(model: nn.Module) -> Scheme | None:
    """The scheme a prepared model was prepared with (None if it was never prepared)."""
    mods = fake_quant_modules(model)
    return next(iter(mods.values())).scheme if mods else None


def unprepare(model: nn.Module) -> nn.Module:
    """Swap fake-quant modules back for plain float ones (LoRA layers become merged ``nn.Linear``)."""
    for fqn, mod in fake_quant_modules(model).items():
        _set_child(model, fqn, mod.to_embedding() if isinstance(mod, FakeQuantEmbedding) else mod.to_linear())
    return model


@torch.no_grad()
def convert(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Strip the fake-quant wrappers and apply the scheme's torchao inference quantization, in place.

    Linears go through ``quantize_(model, scheme.inference_config())`` restricted to the layers that
    were prepared, then layers with learned ranges get their codes and qparams rewritten from the
    learned scale (and zero) (:func:`write_learned_qparams`); embeddings (if prepared) through
    ``scheme.embedding_config()``; LoRA layers are merged first. ``dtype`` (default: the model's) is
    cast to first. ``lowbit.eval.deploy`` calls this and then moves bf16 ``8da4w`` (and ``8da3w`` /
    ``8da2w``) onto the faster tinygemm int4 kernel (``Int8DynActInt4Linear``, within 1 bf16 ulp, not
    bit-exact). The ggml schemes (``q4_0`` / ``q8_0``) stay their exact fake-quant simulation (their
    deployment is a GGUF file, ``lowbit export``). The result is the deployable CPU model whose forward
    the prepared model simulated.

    Raises:
        ValueError: the model was never prepared, or lives on the meta device.
    """
    from torchao.quantization import quantize_

    from lowbit.qat.inference import float_dtype, keep_global_config

    mods = fake_quant_modules(model)
    if not mods:
        raise ValueError("convert: model was never prepared with lowbit.qat.prepare (no fake-quant modules)")
    scheme = next(iter(mods.values())).scheme
    for fqn, m in mods.items():
        if m.weight.is_meta:
            raise ValueError(
                f"convert: layer {fqn!r} is on the meta device; load real weights before convert"
            )
    lin_fqns = {n for n, m in mods.items() if not isinstance(m, FakeQuantEmbedding)}
    emb_fqns = {n for n, m in mods.items() if isinstance(m, FakeQuantEmbedding)}
    clamp_learned_ranges_(model)
    learned = {n: tuple(None if t is None else t.detach() for t in m.learned_qparams())
               for n, m in mods.items() if getattr(m, "learned_qparams", lambda: None)() is not None}
    model.to(dtype or float_dtype(model))  # the learned qparams above keep their own dtype
    if scheme.name in GGML_SCHEMES:
        return model
    unprepare(model)
    floats = {n: model.get_submodule(n).weight.detach() for n in learned}
    with keep_global_config():
        if lin_fqns:
            quantize_(model, scheme.inference_config(), filter_fn=lambda m, fqn: fqn in lin_fqns)
        for fqn, (scale, zero) in learned.items():
            write_learned_qparams(model.get_submodule(fqn).weight, floats[fqn], scheme, scale, zero)
        if emb_fqns:
            quantize_(model, scheme.embedding_config(), filter_fn=lambda m, fqn: fqn in emb_fqns)
    return model


def convert_checkpoint_model(model: nn.Module, scheme: str | Scheme, group_size: int | None = None,
                             *, embeddings: bool = False,
                             qparams: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Inference quantization of a plain float model with the same layer selection ``prepare`` makes.

    Used for a QAT checkpoint (a plain float state dict loaded into a float model, plus its learned
    ``qparams`` if it has them) and for PTQ of a non-QAT model: ``convert(prepare(model, scheme))``.
    """
    model = prepare(model, scheme, group_size=group_size, embeddings=embeddings)
    if qparams:
        load_learned_qparams(model, qparams)
    return convert(model)


def learned_qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned qparams of a prepared model, ``{"<layer fqn>.weight_scale": [N, K // g], ...}``."""
    return {f"{fqn}.{name}": p for fqn, m in fake_quant_modules(model).items()
            for name, p in m.named_parameters(recurse=False) if name in QPARAM_NAMES}


def load_learned_qparams(model: nn.Module, qparams: dict[str, torch.Tensor]) -> nn.Module:
    """Give the prepared layers of ``model`` the learned qparams ``qparams`` (as :func:`learned_qparams`
    returns them; e.g. a checkpoint's ``qparams.safetensors``).

    Raises:
        ValueError: a key names no prepared layer, or a shape differs from the layer's groups.
    """
    mods = fake_quant_modules(model)
    for key, value in qparams.items():
        fqn, _, name = key.rpartition(".")
        mod = mods.get(fqn)
        if mod is None or name not in QPARAM_NAMES:
            raise ValueError(f"learned qparam {key!r} names no layer prepared for QAT in this model")
        if mod.learned_qparams() is None:
            mod.learn_ranges()
        target = getattr(mod, name, None)
        if target is None or target.shape != value.shape:
            raise ValueError(f"learned qparam {key!r}: shape {tuple(value.shape)} does not fit layer {fqn!r} "
                             f"({None if target is None else tuple(target.shape)} expected)")
        with torch.no_grad():
            target.copy_(value)
    return model


def clamp_learned_ranges_(model: nn.Module) -> int:
    """Raise learned scales driven to zero or below to the smallest valid scale (logged once per model)."""
    n = sum(m.clamp_ranges_() for m in fake_quant_modules(model).values() if hasattr(m, "clamp_ranges_"))
    if n and not getattr(model, "_lowbit_clamp_logged", False):
        logger.warning("lowbit.qat: %d learned weight scale(s) fell to zero or below and were clamped to the "
                       "smallest valid scale (lower the ranges' learning rate if this repeats)", n)
        model._lowbit_clamp_logged = True
    return n


@torch.no_grad()
def write_learned_qparams(weight: torch.Tensor, float_weight: torch.Tensor, scheme: Scheme,
                          scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """Rewrite a torchao-quantized ``weight`` (what ``quantize_`` made of ``float_weight`` ``[N, K]``) with
    codes and qparams computed from the learned ``scale`` (and ``zero``), in place.

    ``IntxUnpackedToInt8Tensor`` (8da4w, the sub-4-bit schemes): ``qdata = clamp(round(w / scale))``,
    ``scale``; ``Int4OpaqueTensor`` (4w): tinygemm codes packed with the CPU kernel's own packing, and
    the scale / zero packed as torchao packs them.
    """
    g = scheme.group_size
    # the clamp the prepared forward applies (LearnedRanges.learned_qparams), in the scale's own dtype
    scale = scale.clamp(min=1e-6 if scheme.name == "4w" else torch.finfo(scale.dtype).eps)
    if scheme.name == "4w":
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        q = quantize_tinygemm(float_weight, scale.to(float_weight.dtype), zero.to(float_weight.dtype), g)
        weight.qdata = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        dtype = float_weight.dtype
        weight.scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(dtype), zero.to(dtype), dtype)
        return
    s = scale.to(weight.scale.dtype)
    weight.qdata = quantize(float_weight, s, None, *scheme.weight_range, group_size=g).to(torch.int8)
    weight.scale = s.reshape(weight.scale.shape)
