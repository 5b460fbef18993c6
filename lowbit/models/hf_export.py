"""Write a Hugging Face Llama directory (``config.json``, ``model.safetensors``, tokenizer files) from any
checkpoint lowbit loads (a GGUF, a lowbit checkpoint, a model name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf

from lowbit.models.checkpoint import atomic_dir, load_checkpoint
from lowbit.models.presets import ModelArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def hf_config(args: ModelArgs, tokenizer_config: dict) -> dict:
    """The ``config.json`` of a transformers ``LlamaForCausalLM`` with ``args``' shape and RoPE."""
    rope = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
        "hidden_size": args.embed_dim, "intermediate_size": args.intermediate_dim,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.embed_dim // args.num_heads,
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_base, "rope_scaling": rope,
        "rms_norm_eps": args.norm_eps, "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        **{k: tokenizer_config[k] for k in ("bos_token_id", "eos_token_id") if k in tokenizer_config},
    }


def export_hf(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Convert ``src`` (anything :func:`~lowbit.models.checkpoint.load_checkpoint` takes) into a Hugging
    Face Llama directory ``out``, written atomically. Weights are saved in float32, Q/K permuted to
    transformers' rotate-half layout. Refuses an existing ``out`` unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    model, tokenizer, meta = load_checkpoint(src)
    args = ModelArgs.from_dict(meta["model_args"])
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    hf = tune_to_hf(sd, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, dim=args.embed_dim)
    tok_dir = Path(meta["tokenizer_dir"])
    tok_cfg = {}
    if (tok_dir / "tokenizer_config.json").exists():
        tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(args, ids), indent=1))
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                shutil.copyfile(tok_dir / name, tmp / name)
        if "chat_template" in tok_cfg and not (tok_dir / "generation_config.json").exists():
            (tmp / "generation_config.json").write_text(json.dumps(ids, indent=1))
    return out


