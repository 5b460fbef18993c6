"""Llama-architecture GGUF files (llama.cpp's format) as torchtune decoders, read with the ``gguf`` package.

The ``gguf`` package (llama.cpp's own reader) parses the file and dequantizes every tensor type to
float32; this module only maps names, shapes and metadata:

- tensors: ``blk.N.attn_q.weight`` -> ``layers.N.attn.q_proj.weight`` etc. GGUF stores Q/K in the
  interleaved-pair RoPE layout that torchtune uses, so no permutation is needed (Hugging Face's layout
  differs; :mod:`lowbit.models.hf_export` converts);
- RoPE: plain, or Llama-3 scaling when the file carries ``rope_freqs.weight`` (matched against the
  Llama-3 rule; other scalings fail naming the key);
- tied output head when the file has no ``output.weight``;
- tokenizer: the byte-level BPE in ``tokenizer.ggml.*`` rebuilt with HF ``tokenizers`` (special tokens,
  BOS/EOS and the chat template kept) and written as ``tokenizer.json`` + ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from lowbit.models.presets import ModelArgs, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types this loader is tested on; ``gguf`` dequantizes them (and more) to float32.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "sa_norm.scale",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.output_proj.weight",
    "ffn_norm.weight": "mlp_norm.scale",
    "ffn_gate.weight": "mlp.w1.weight",
    "ffn_down.weight": "mlp.w2.weight",
    "ffn_up.weight": "mlp.w3.weight",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.scale",
              "output.weight": "output.weight"}

# Pre-tokenizer split rules by ``tokenizer.ggml.pre`` (llama.cpp's names).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    # name: (split digits one by one first, regex)
    "gpt2": (False, _GPT2_PATTERN),
    "gpt-2": (False, _GPT2_PATTERN),  # llama.cpp's name for the plain GPT-2 split
    "default": (False, _GPT2_PATTERN),
    "smollm": (True, _GPT2_PATTERN),
    "starcoder": (True, _GPT2_PATTERN),
    "llama-bpe": (False, _LLAMA3_PATTERN),
}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """A GGUF file lowbit cannot load; the message names the file and what is wrong."""


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct / numpy errors on bad bytes
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _require(reader, path: Path, key: str):
    v = _field(reader, key)
    if v is None:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    return v


def model_args(reader, path: Path) -> ModelArgs:
    """:class:`ModelArgs` from a GGUF's ``llama.*`` metadata (and ``rope_freqs.weight`` if present)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; "
                        f"lowbit loads {list(SUPPORTED_ARCHITECTURES)}")
    p = arch + "."
    dim = int(_require(reader, path, p + "embedding_length"))
    heads = int(_require(reader, path, p + "attention.head_count"))
    rope_dim = _field(reader, p + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // heads:
        raise GGUFError(f"{path}: {p}rope.dimension_count={rope_dim} != head dim {dim // heads} "
                        "(partial RoPE is not supported)")
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: {p}rope.scaling.type={scaling!r} is not supported (plain RoPE or Llama-3 "
                        "rope_freqs only)")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(_require(reader, path, "tokenizer.ggml.tokens"))
    base = float(_field(reader, p + "rope.freq_base", 10_000.0))
    context = int(_require(reader, path, p + "context_length"))
    args = ModelArgs(
        vocab_size=int(vocab), num_layers=int(_require(reader, path, p + "block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)), embed_dim=dim,
        intermediate_dim=int(_require(reader, path, p + "feed_forward_length")), max_seq_len=context,
        rope_base=int(base) if base.is_integer() else base,
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
    )
    if "rope_freqs.weight" in names:
        freqs = _tensor(reader, path, "rope_freqs.weight")
        args = ModelArgs.from_dict({**args.to_dict(), "rope_scaling": _llama3_scaling(freqs, args, path)})
    return args


def _llama3_scaling(freqs: torch.Tensor, args: ModelArgs, path: Path) -> RopeScaling:
    """The Llama-3 scaling whose per-frequency divisors equal the file's ``rope_freqs`` (llama.cpp bakes
    the rule into that tensor); any other tensor fails."""
    head_dim = args.embed_dim // args.num_heads
    inv = 1.0 / (args.rope_base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv
    found = freqs.double().numpy()
    s = RopeScaling(factor=float(found.max()))
    low, high = s.original_max_position_embeddings / s.low_freq_factor, \
        s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    expect = np.where(wavelen < high, 1.0,
                      np.where(wavelen > low, s.factor, 1.0 / ((1 - smooth) / s.factor + smooth)))
    if found.shape != expect.shape or not np.allclose(found, expect, rtol=1e-5):
        raise GGUFError(f"{path}: rope_freqs.weight does not follow the Llama-3 RoPE scaling rule; other "
                        "frequency scalings are not supported")
    return s


def _tensor(reader, path: Path, name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    t = next(t for t in reader.tensors if t.name == name)
    kind = GGMLQuantizationType(t.tensor_type).name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {name!r} has type {kind}; supported: {list(SUPPORTED_TYPES)}")
    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise GGUFError(f"{path}: tensor {name!r} ({kind}) could not be read (truncated or corrupt?): "
                        f"{e}") from None
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def state_dict(reader, path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Float32 torchtune state dict of every weight in the file."""
    out = {}
    for t in reader.tensors:
        name = t.name
        if name == "rope_freqs.weight":
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in _LAYER_NAMES:
            key = f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        elif name in _TOP_NAMES:
            key = _TOP_NAMES[name]
        else:
            raise GGUFError(f"{path}: unexpected tensor {name!r} for a Llama model")
        out[key] = _tensor(reader, path, name)
    return out


def write_tokenizer(reader, path: Path, out_dir: Path) -> Path:
    """Rebuild the file's tokenizer with HF ``tokenizers``; writes ``tokenizer.json`` and
    ``tokenizer_config.json`` (BOS/EOS/PAD/UNK, ``add_bos_token``, chat template) into ``out_dir``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; lowbit reads byte-level BPE ('gpt2') "
                        "tokenizers")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(_require(reader, path, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, path, "tokenizer.ggml.merges")]
    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   ignore_merges=pre == "llama-bpe"))
    except Exception as e:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens / merges do not form a BPE tokenizer: {e}") from None
    digits, pattern = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated")]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    def name_of(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    config = {
        "bos_token": name_of("bos"), "eos_token": name_of("eos"), "pad_token": name_of("padding"),
        "unk_token": name_of("unknown"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None}, indent=1))
    return out_dir


def read_gguf(path: str | Path, tokenizer_dir: str | Path | None = None):
    """Read a Llama GGUF: ``(model_args, float32 state_dict, tokenizer_dir or None)``.

    The tokenizer is written into ``tokenizer_dir`` when one is given.
    """
    path = Path(path)
    reader = _reader(path)
    args = model_args(reader, path)
    sd = state_dict(reader, path, args)
    tok = write_tokenizer(reader, path, Path(tokenizer_dir)) if tokenizer_dir is not None else None
    return args, sd, tok
