"""Tokenizers: a byte-level BPE trained offline on lowbit's corpus, or a user's own.

Both load as torchtune tokenizers (``encode(text, add_bos, add_eos)``, ``decode``, ``bos_id``,
``eos_id``): a directory with ``tokenizer.json`` (+ ``tokenizer_config.json``) goes through torchtune's
``HuggingFaceBaseTokenizer``; a Llama-3 ``tokenizer.model`` (tiktoken) through ``llama3_tokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save ``tokenizer.json`` + ``tokenizer_config.json``.

    Deterministic for the same texts and vocab size. Byte-level, so any UTF-8 text encodes.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a directory (``tokenizer.json`` or ``original/tokenizer.model``) or file."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            cfg = path / "tokenizer_config.json"
            gen = path / "generation_config.json"
            return HuggingFaceBaseTokenizer(
                str(path / "tokenizer.json"),
                tokenizer_config_json_path=str(cfg) if cfg.exists() else None,
                generation_config_path=str(gen) if gen.exists() else None,
            )
        for candidate in (path / "original" / "tokenizer.model", path / "tokenizer.model"):
            if candidate.exists():
                return load_tokenizer(candidate)
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model found in {path}")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        from torchtune.models.llama3 import llama3_tokenizer

        return llama3_tokenizer(str(path))
    raise ValueError(f"unrecognized tokenizer file {path}: expected a directory or a tokenizer.model")


def vocab_size_of(tokenizer) -> int:
    """Number of token ids the tokenizer can produce."""
    if isinstance(tokenizer, HuggingFaceBaseTokenizer):
        return tokenizer.tokenizer.get_vocab_size()
    return tokenizer.vocab_size
