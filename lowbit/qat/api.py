"""prepare / convert / enable_fake_quant: the QAT workflow on a whole model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from lowbit.qat.modules import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    FakeQuantLoRALinear,
    _lora_cls,
)
from lowbit.qat.schemes import GGML_SCHEMES, Scheme, get_scheme

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
) -> nn.Module:
    """Swap ``nn.Linear`` (and torchtune ``LoRALinear``) for fake-quant modules, in place.

    Args:
        model: any module tree; may live on the meta device (parameters are shared, never copied).
        scheme: ``"8da4w" | "4w" | "8w" | "8da8w"`` or a :class:`Scheme`.
        group_size: weight group size for the per-group schemes (see :func:`get_scheme`).
        filter_fn: ``(module, fqn) -> bool``; only modules for which it returns True are swapped.
        embeddings: also fake-quantize ``nn.Embedding`` weights (weight-only, ``scheme.embedding_config()``).

    Layers whose shape the scheme's kernel cannot take (``scheme.fits`` is False, e.g. ``in_features``
    not divisible by ``group_size``) stay float; they are listed in one log line, and ``convert`` leaves
    them float too. Returns ``model``.

    Raises:
        ValueError: unknown scheme / bad group size; model already prepared; ``embeddings=True`` on a
            model whose embedding weight is tied to another layer (not supported: the tied head would
            be quantized as a linear by inference but as an embedding here).
    """
    if isinstance(scheme, Scheme):
        if group_size is not None and group_size != scheme.group_size:
            raise ValueError(f"group_size={group_size} conflicts with scheme {scheme}")
    else:
        scheme = get_scheme(scheme, group_size)
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
    were prepared; embeddings (if prepared) through ``scheme.embedding_config()``; LoRA layers are
    merged first (``lowbit.qat.inference.apply_inference_quant``). ``dtype`` (default: the model's)
    is cast to first. ``lowbit.eval.deploy`` calls this and then moves bf16 ``8da4w`` onto the faster
    tinygemm int4 kernel (``Int8DynActInt4Linear``, within 1 bf16 ulp, not bit-exact). The ggml
    schemes (``q4_0`` / ``q8_0``) stay their exact fake-quant simulation (their deployment is a GGUF
    file). The result is the deployable CPU model whose forward the prepared model simulated.

    Raises:
        ValueError: the model was never prepared, or lives on the meta device.
    """
    from lowbit.qat.inference import apply_inference_quant, float_dtype

    mods = fake_quant_modules(model)
    if not mods:
        raise ValueError("convert: model was never prepared with lowbit.qat.prepare (no fake-quant modules)")
    scheme = next(iter(mods.values())).scheme
    for fqn, m in mods.items():
        if m.weight.is_meta:
            raise ValueError(
                f"convert: layer {fqn!r} is on the meta device; load real weights before convert"
            )
    dtype = dtype or float_dtype(model)
    model.to(dtype)
    if scheme.name in GGML_SCHEMES:
        return model
    lin_fqns = [n for n, m in mods.items() if not isinstance(m, FakeQuantEmbedding)]
    emb_fqns = [n for n, m in mods.items() if isinstance(m, FakeQuantEmbedding)]
    unprepare(model)
    apply_inference_quant(model, scheme, lin_fqns, emb_fqns)
    return model


def convert_checkpoint_model(model: nn.Module, scheme: str | Scheme, group_size: int | None = None,
                             *, embeddings: bool = False) -> nn.Module:
    """Inference quantization of a plain float model with the same layer selection ``prepare`` makes.

    Used for a QAT checkpoint (a plain float state dict loaded into a float model) and for PTQ of a
    non-QAT model: ``convert(prepare(model, scheme))``.
    """
    return convert(prepare(model, scheme, group_size=group_size, embeddings=embeddings))
