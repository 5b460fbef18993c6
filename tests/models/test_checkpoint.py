import json

import pytest
import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf

from lowbit.data import generate_corpus
from lowbit.models import build_model, get_preset, init_weights
from lowbit.models.checkpoint import atomic_dir, load_checkpoint, resolve_checkpoint, save_model_dir
from lowbit.models.tokenizer import train_bpe_tokenizer


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = init_weights(build_model("tiny", num_layers=2)).eval()
    tok_dir = train_bpe_tokenizer(generate_corpus(64), 1024, tmp_path / "tok")
    return model, tok_dir


def test_atomic_dir_leaves_previous_contents_on_interrupt(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a").write_text("one")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as d:
            (d / "a").write_text("two")
            raise KeyboardInterrupt
    assert (final / "a").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_lowbit_checkpoint_round_trip(tmp_path, tiny):
    model, tok_dir = tiny
    args = get_preset("tiny").to_dict() | {"num_layers": 2}
    with atomic_dir(tmp_path / "run" / "checkpoints" / "step_000007") as d:
        save_model_dir(d, model.state_dict(), {"model_args": args, "step": 7}, tok_dir)
    loaded, tok, meta = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 1000, (2, 20))
    assert torch.equal(model(x), loaded(x))
    assert meta["step"] == 7 and tok.encode("Then she", add_bos=False, add_eos=False)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
        resolve_checkpoint(tmp_path / "empty")


def test_hugging_face_checkpoint_loads_through_torchtune_checkpointer(tmp_path, tiny):
    """A tiny HF-format Llama dir (safetensors + config.json + tokenizer files) written here loads to
    the same function as the torchtune model it was converted from."""
    model, tok_dir = tiny
    a = get_preset("tiny")
    hf = tmp_path / "hf"
    hf.mkdir()
    sd = tune_to_hf(model.state_dict(), num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, dim=a.embed_dim)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": a.vocab_size,
        "hidden_size": a.embed_dim, "intermediate_size": a.intermediate_dim, "num_hidden_layers": 2,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
        "max_position_embeddings": a.max_seq_len, "rope_theta": a.rope_base, "rms_norm_eps": a.norm_eps,
        "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "rope_type": "llama3", "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "torch_dtype": "float32",
    }))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / f).write_bytes((tok_dir / f).read_bytes())
    loaded, tok, meta = load_checkpoint(hf)
    assert meta["format"] == "huggingface" and meta["model_args"]["num_layers"] == 2
    x = torch.randint(0, 1000, (2, 20))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- RoPE from HF configs
def _hf_llama_dir(tmp_path, rope_scaling, tie=True):
    """A random 2-layer Llama written by transformers itself, plus a tokenizer lowbit can read."""
    transformers = pytest.importorskip("transformers")
    from lowbit.models.tokenizer import train_bpe_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "hf"
    model.save_pretrained(out)
    train_bpe_tokenizer(["some text to train on"] * 4, 280, out)
    return out, model


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 256},
])
def test_hf_rope_follows_the_config(tmp_path, rope_scaling):
    """No rope_scaling -> plain RoPE; llama3 scaling with its own factors; logits equal transformers'
    at positions past the original context, where the two RoPEs differ most."""
    path, ref = _hf_llama_dir(tmp_path, rope_scaling)
    model, _, meta = load_checkpoint(path)
    got = meta["model_args"]["rope_scaling"]
    if rope_scaling is None:
        assert got is None
    else:
        assert got == {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 256}
    x = torch.randint(0, 300, (1, 600))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_hf_unknown_rope_type_fails_naming_it(tmp_path):
    from lowbit.models.checkpoint import hf_model_args

    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        hf_model_args(cfg)
