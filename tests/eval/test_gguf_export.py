"""GGUF export: blocks dequantize (with ``gguf``) to the fake-quant weights bit for bit; the file loads back
through lowbit's GGUF reader to the fake-quant logits; bad input; llama.cpp's own logits (if installed)."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from lowbit import qat
from lowbit.eval.gguf_export import GGUFExportError, export_gguf
from lowbit.models import build_model
from lowbit.models.checkpoint import atomic_dir, load_checkpoint, save_model_dir
from lowbit.models.presets import ModelArgs, get_preset
from lowbit.models.tokenizer import train_bpe_tokenizer
from lowbit.qat.linear import fake_quant_weight_ggml

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:40]
    return train_bpe_tokenizer(texts, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer")


def _checkpoint(path, tokenizer_dir, *, tied=False, scheme="q4_0", embeddings=None, seed=0, **shape):
    args = ModelArgs.from_dict({**get_preset("tiny").to_dict(), "num_layers": 2, "vocab_size": VOCAB,
                                "tie_word_embeddings": tied, **shape})
    torch.manual_seed(seed)
    model = build_model(args)
    meta = {"model_args": args.to_dict(), "qat_scheme": scheme, "qat_group_size": 32 if scheme else None,
            "qat_embeddings": (not tied) if embeddings is None else embeddings}
    with atomic_dir(path) as tmp:
        save_model_dir(tmp, model.state_dict(), meta, tokenizer_dir)
    return path


def _prepared(ckpt, kind, act=True):
    model, _, meta = load_checkpoint(ckpt)
    qat.prepare(model, kind, embeddings=bool(meta.get("qat_embeddings")))
    if not act:
        for m in qat.fake_quant_modules(model).values():
            m.scheme = dataclasses.replace(m.scheme, activation=None)
    return model


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_exported_blocks_dequantize_to_the_fake_quant_weights_bit_for_bit(tmp_path, tokenizer_dir, kind):
    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer_dir, scheme=kind)
    out = export_gguf(ckpt, tmp_path / "m.gguf", kind)
    model, _, _ = load_checkpoint(ckpt)
    sd = model.state_dict()
    reader = GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    qtype = T.Q4_0 if kind == "q4_0" else T.Q8_0
    names = {"blk.1.attn_q.weight": "layers.1.attn.q_proj.weight", "output.weight": "output.weight",
             "blk.0.ffn_down.weight": "layers.0.mlp.w2.weight", "token_embd.weight": "tok_embeddings.weight"}
    n_block = sum(T(t.tensor_type) == qtype for t in reader.tensors)
    assert n_block == 2 * 7 + 2  # every linear, the head and the (QAT-quantized) embedding
    for gname, key in names.items():
        t = tensors[gname]
        assert T(t.tensor_type) == qtype, gname
        got = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        got = got.reshape(sd[key].shape)
        assert torch.equal(got, fake_quant_weight_ggml(sd[key], kind)), gname
    assert T(tensors["blk.0.attn_norm.weight"].tensor_type) == T.F32
    assert "rope_freqs.weight" in tensors  # tiny uses Llama-3.2 RoPE scaling


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_back_to_the_fake_quant_logits(tmp_path, tokenizer_dir, tied):
    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer_dir, tied=tied, scheme="q4_0")
    out = export_gguf(ckpt, tmp_path / "m.gguf", "q4_0")
    loaded, tok, meta = load_checkpoint(out)  # lowbit's GGUF reader (gguf's dequantizer)
    fake = _prepared(ckpt, "q4_0", act=False)  # the weights llama.cpp holds, without activation quant
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), fake(tokens))
    assert meta["model_args"]["tie_word_embeddings"] is tied
    ref_tok = load_checkpoint(ckpt)[1]
    text = "def f(x):\n    return x + 1  # the  answer"
    kw = {"add_bos": False, "add_eos": False}
    assert tok.encode(text, **kw) == ref_tok.encode(text, **kw)


def test_bad_input(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import gguf

    from lowbit import cli

    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer_dir, scheme="q4_0")
    out = tmp_path / "m.gguf"
    assert cli.main(["export", str(ckpt), "--to", "gguf", "--type", "q4_0", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["export", str(ckpt), "--to", "gguf", "--type", "q4_0", str(out)]) == 2
    assert "exists; pass force=True (--force)" in capsys.readouterr().err
    assert cli.main(["export", str(ckpt), "--to", "gguf", "--type", "q4_0", str(out), "--force"]) == 0
    with pytest.raises(GGUFExportError, match=r"trained with QAT scheme 'q4_0'.*\['q4_0', 'q8_0'\]"):
        export_gguf(ckpt, tmp_path / "x.gguf", "q8_0")
    other = _checkpoint(tmp_path / "c8da4w", tokenizer_dir, scheme="8da4w", embeddings=False)
    with pytest.raises(GGUFExportError, match=r"QAT scheme '8da4w', which llama.cpp cannot hold.*'q4_0'"):
        export_gguf(other, tmp_path / "x.gguf", "q4_0")
    with pytest.raises(GGUFExportError, match=r"GGUF type 'q4_k' is not one lowbit writes.*'q8_0'"):
        export_gguf(ckpt, tmp_path / "x.gguf", "q4_k")
    odd = _checkpoint(tmp_path / "odd", tokenizer_dir, scheme=None, embeddings=False, intermediate_dim=144)
    with pytest.raises(GGUFExportError, match=r"layer 'layers.0.mlp.w2' has in_features 144, not a multiple "
                                              r"of llama.cpp's Q4_0 block size 32"):
        export_gguf(odd, tmp_path / "x.gguf", "q4_0")
    assert export_gguf(odd, tmp_path / "odd.gguf", "f16").exists()  # float types take any width

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(ckpt, tmp_path / "late.gguf", "q4_0")
    assert not (tmp_path / "late.gguf").exists()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install 'lowbit[bench]')")
def test_llama_cpp_logits_on_the_exported_file(tmp_path, tokenizer_dir):
    """llama.cpp (the real consumer) on lowbit's files. F32: the same model (export and graph correct).
    Q8_0: closer to the fake quant with Q8_0 activations than without (the simulation is llama.cpp's);
    the remaining difference is measured and printed (fp32 summation order flips rounding decisions)."""
    from llama_cpp import Llama

    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer_dir, scheme=None, embeddings=False)
    tokens = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()

    def llama_logits(path):
        llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False, type_k=0,
                    type_v=0)
        try:
            llm.eval(tokens)
            return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        finally:
            llm.close()

    with torch.no_grad():
        float_ref = load_checkpoint(ckpt)[0](torch.tensor([tokens]))[0]
        got = llama_logits(export_gguf(ckpt, tmp_path / "f32.gguf", "f32"))
        assert (got - float_ref).abs().max() < 1e-3 * float_ref.abs().max()
        got = llama_logits(export_gguf(ckpt, tmp_path / "q8.gguf", "q8_0"))
        on = _prepared(ckpt, "q8_0")(torch.tensor([tokens]))[0]
        off = _prepared(ckpt, "q8_0", act=False)(torch.tensor([tokens]))[0]
    d_on, d_off = (got - on).abs(), (got - off).abs()
    print(f"llama.cpp Q8_0 vs lowbit fake quant: max |diff| {d_on.max():.4g} (mean {d_on.mean():.3g}); "
          f"without activation quant {d_off.max():.4g} (mean {d_off.mean():.3g}); "
          f"logits max {on.abs().max():.3g}")
    assert d_on.mean() < d_off.mean()
    assert (got.argmax(-1) == on.argmax(-1)).float().mean() >= 0.9


def test_a_q4_0_qat_run_exports_its_fake_quant_weights(tmp_path):
    """The recipe trains q4_0 (untied, embeddings quantized); its checkpoint exports bit-exactly."""
    from lowbit.recipes.runner import run_recipe
    from tests.conftest import SMALL_RUN

    out = tmp_path / "run"
    run_recipe("qat_recipe", "tiny_qat", [
        *SMALL_RUN, "max_steps=2", f"output_dir={out}", "qat.scheme=q4_0", "qat.group_size=null",
        "qat.embeddings=true", "model.overrides.tie_word_embeddings=false", "tokenizer.vocab_size=300",
    ])
    (ckpt,) = (out / "checkpoints").iterdir()
    path = export_gguf(ckpt, tmp_path / "qat.gguf", "q4_0")
    sd = load_checkpoint(ckpt)[0].state_dict()
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    got = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    assert T(t.tensor_type) == T.Q4_0
    assert torch.equal(got.reshape(sd["tok_embeddings.weight"].shape),
                       fake_quant_weight_ggml(sd["tok_embeddings.weight"], "q4_0"))
