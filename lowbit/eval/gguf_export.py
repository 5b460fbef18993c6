"""Export a model to a llama.cpp GGUF file whose weights are exactly what its QAT scheme simulated.

``export_gguf(src, out, "q4_0")`` loads ``src`` (anything ``load_checkpoint`` takes), selects the
layers as ``qat.prepare`` does for the scheme of the same name (every linear; the untied embedding too
when the checkpoint recorded ``qat_embeddings``) and writes them as llama.cpp Q4_0 / Q8_0 blocks with
:mod:`lowbit.quant.ggml` (so ``gguf``'s dequantizer returns the fake-quant weights bit for bit). Norms
and unquantized embeddings are F32 (``float_type="f16"`` for F16); ``f16`` / ``f32`` write every matrix
in that type. A QAT checkpoint trained with another scheme is refused: llama.cpp cannot hold torchao's
lattices (the QAT gain would be lost).

The file carries what llama.cpp needs to load it: ``llama.*`` hyperparameters, ``rope_freqs.weight`` for
Llama-3 RoPE scaling, and the byte-level BPE tokenizer (tokens, types, merges, pre-tokenizer name,
BOS/EOS, chat template) rebuilt from the checkpoint's ``tokenizer.json``. It is written under a temporary
name in the same directory and renamed when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

GGUF_TYPES: tuple[str, ...] = ("q4_0", "q8_0", "f16", "f32")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_*

_LAYER = {
    "sa_norm.scale": "attn_norm.weight", "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
    "attn.output_proj.weight": "attn_output.weight", "mlp_norm.scale": "ffn_norm.weight",
    "mlp.w1.weight": "ffn_gate.weight", "mlp.w2.weight": "ffn_down.weight", "mlp.w3.weight": "ffn_up.weight",
}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.scale": "output_norm.weight",
        "output.weight": "output.weight"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


class GGUFExportError(ValueError):
    """The model cannot be written as the requested GGUF; the message names the scheme, type or layer."""


def gguf_name(key: str) -> str:
    """GGUF tensor name of a torchtune state-dict key (``layers.3.attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``)."""
    if key in _TOP:
        return _TOP[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER:
        return f"blk.{parts[1]}.{_LAYER[parts[2]]}"
    raise GGUFExportError(f"tensor {key!r} has no GGUF name in a Llama model")


def block_layers(model: nn.Module, kind: str, embeddings: bool) -> list[str]:
    """State-dict keys written as ``kind`` blocks: the weight of every ``nn.Linear`` (and of the untied
    embedding when ``embeddings``), chosen exactly as ``qat.prepare`` chooses them. ``model`` may live
    on the meta device; it is prepared in place (pass a throwaway copy).

    Raises:
        GGUFExportError: a linear whose ``in_features`` is not a multiple of 32 (named).
    """
    from lowbit import qat

    bad = [(n, m.in_features) for n, m in model.named_modules()
           if type(m) is nn.Linear and m.in_features % 32]
    if bad:
        raise GGUFExportError(f"layer {bad[0][0]!r} has in_features {bad[0][1]}, not a multiple of "
                              f"llama.cpp's {kind.upper()} block size 32 ({len(bad)} such layer(s))")
    qat.prepare(model, kind, embeddings=embeddings)
    return [f"{n}.weight" for n in qat.fake_quant_modules(model)]


def rope_freqs(args) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs.weight`` (per-frequency divisors) for Llama-3 RoPE scaling, else None."""
    s = args.rope_scaling
    if s is None:
        return None
    head_dim = args.embed_dim // args.num_heads
    inv = 1.0 / (args.rope_base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv
    low, high = s.original_max_position_embeddings / s.low_freq_factor, \
        s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high, 1.0, np.where(wavelen > low, s.factor, mid)).astype(np.float32)


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer (byte-level BPE only)."""
    from lowbit.models.gguf import _GPT2_PATTERN, _LLAMA3_PATTERN

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    digits = bool(steps) and kinds[0] == "Digits" and steps[0].get("individual_digits")
    rest = steps[1:] if digits else steps
    pattern = None
    if rest and rest[0].get("type") == "Split":
        pattern = (rest[0].get("pattern") or {}).get("Regex")
        rest = rest[1:]
    if len(rest) == 1 and rest[0].get("type") == "ByteLevel":
        if pattern is None and rest[0].get("use_regex", True):
            pattern = _GPT2_PATTERN
        if pattern == _GPT2_PATTERN:
            return "smollm" if digits else "gpt-2"  # llama.cpp's names
        if pattern == _LLAMA3_PATTERN and not digits:
            return "llama-bpe"
    raise GGUFExportError(f"{path}: pre-tokenizer {kinds} has no llama.cpp equivalent lowbit knows "
                          "(byte-level BPE with the GPT-2 or Llama-3 split, optionally single digits)")


def tokenizer_fields(tok_dir: Path, n_vocab: int) -> dict:
    """``tokenizer.ggml.*`` values from ``tok_dir/tokenizer.json`` (+ ``tokenizer_config.json``), padded
    with unused tokens to the model's ``n_vocab`` embedding rows."""
    path = tok_dir / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{path} not found: GGUF export needs the checkpoint's HF tokenizer.json")
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export writes byte-level "
                              "BPE")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    by_id = {i: t for t, i in vocab.items()}
    n = max(n_vocab, max(by_id) + 1)
    if n > n_vocab:
        raise GGUFExportError(f"{path}: tokenizer has {max(by_id) + 1} tokens, the model's embedding "
                              f"{n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            t = by_id[i]
            tokens.append(t)
            types.append((_TOKEN_CONTROL if added[t].get("special") else _TOKEN_USER_DEFINED)
                         if t in added else _TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def token_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None

    return {"pre": _pre_tokenizer_name(tj.get("pre_tokenizer"), path), "tokens": tokens, "types": types,
            "merges": merges, "bos": token_id("bos_token"), "eos": token_id("eos_token"),
            "pad": token_id("pad_token"), "unk": token_id("unk_token"),
            "add_bos": cfg.get("add_bos_token"), "chat_template": cfg.get("chat_template")}


def _check_scheme(meta: dict, kind: str) -> None:
    from lowbit.qat.schemes import GGML_SCHEMES

    trained = meta.get("qat_scheme")
    if trained and trained != kind and not (trained in GGML_SCHEMES and kind in ("f16", "f32")):
        raise GGUFExportError(
            f"the checkpoint was trained with QAT scheme {trained!r}, which llama.cpp cannot hold: its GGUF "
            f"block types lowbit writes are {[t for t in GGUF_TYPES if t in GGML_SCHEMES]} (and float "
            f"{['f16', 'f32']}); train with qat.scheme=q4_0 or q8_0 to export, or pass a float checkpoint")


def export_gguf(src: str | Path, out: str | Path, kind: str, *, force: bool = False,
                float_type: str = "f32") -> Path:
    """Write ``src`` as the GGUF file ``out`` with its linears in ``kind`` (``q4_0``, ``q8_0``, ``f16``,
    ``f32``). Refuses an existing ``out`` unless ``force``; returns ``out``.

    Raises:
        GGUFExportError: unknown ``kind``; a QAT checkpoint trained with a scheme llama.cpp cannot hold; a
            layer whose width is not a multiple of 32; a tokenizer GGUF cannot describe.
        FileExistsError: ``out`` exists and not ``force``.
    """
    import gguf

    from lowbit.models.checkpoint import load_checkpoint
    from lowbit.models.presets import ModelArgs, build_model
    from lowbit.quant import ggml

    if kind not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {kind!r} is not one lowbit writes; types: {list(GGUF_TYPES)}")
    if float_type not in ("f32", "f16"):
        raise GGUFExportError(f"float_type must be 'f32' or 'f16', got {float_type!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    model, _tok, meta = load_checkpoint(src)
    _check_scheme(meta, kind)
    args = ModelArgs.from_dict(meta["model_args"])
    blocks = set()
    if kind in ("q4_0", "q8_0"):
        with torch.device("meta"):
            skeleton = build_model(args)
        blocks = set(block_layers(skeleton, kind, bool(meta.get("qat_embeddings"))))
    tok = tokenizer_fields(Path(meta["tokenizer_dir"]), args.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{out.name}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(Path(str(meta.get("path", src))).name)
        w.add_file_type(_FILE_TYPE[kind])
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.embed_dim)
        w.add_block_count(args.num_layers)
        w.add_feed_forward_length(args.intermediate_dim)
        w.add_head_count(args.num_heads)
        w.add_head_count_kv(args.num_kv_heads)
        w.add_rope_dimension_count(args.embed_dim // args.num_heads)
        w.add_rope_freq_base(float(args.rope_base))
        w.add_layer_norm_rms_eps(float(args.norm_eps))
        w.add_vocab_size(args.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                         ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
            if tok[key] is not None:
                add(tok[key])
        if tok["add_bos"] is not None:
            w.add_add_bos_token(bool(tok["add_bos"]))
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        freqs = rope_freqs(args)
        if freqs is not None:
            w.add_tensor("rope_freqs.weight", freqs)
        for key, t in model.state_dict().items():
            t = t.detach().float()
            name = gguf_name(key)
            if key in blocks:
                pack, quantize, qtype = ((ggml.pack_q4_0, ggml.quantize_q4_0, gguf.GGMLQuantizationType.Q4_0)
                                         if kind == "q4_0" else
                                         (ggml.pack_q8_0, ggml.quantize_q8_0, gguf.GGMLQuantizationType.Q8_0))
                w.add_tensor(name, pack(*quantize(t)), raw_dtype=qtype)
            elif t.dim() == 2 and (kind == "f16" or (kind != "f32" and float_type == "f16")):
                w.add_tensor(name, t.numpy().astype(np.float16))
            else:
                w.add_tensor(name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
