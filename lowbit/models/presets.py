"""Named Llama-architecture presets built from torchtune components.

``tiny`` trains on two CPU cores in minutes; ``small_150m`` is a ~170M-parameter Llama-shaped model for
CPU inference benchmarks (random weights are fine for speed); the ``llama3_*`` presets are the real
shapes, to be filled from a local Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (Hugging Face ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


LLAMA3_1_ROPE = RopeScaling(factor=8.0)
LLAMA3_2_ROPE = RopeScaling(factor=32.0)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama-architecture decoder (the arguments of torchtune's Llama builders).

    ``rope_scaling`` is ``None`` for plain RoPE (Llama-2, SmolLM, Llama-3.0, ...) or the Llama-3
    frequency scaling (Llama-3.1: factor 8; Llama-3.2: factor 32).
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    rope_base: int = 500_000
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_scaling: RopeScaling | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        d = dict(d)
        family = d.pop("family", None)  # checkpoints written before rope_scaling existed
        if family is not None:
            if "rope_scaling" in d:
                raise ValueError("give 'rope_scaling' or the legacy 'family', not both")
            if family not in ("llama3_1", "llama3_2"):
                raise ValueError(f"unknown model family {family!r}; expected 'llama3_1' or 'llama3_2'")
            d["rope_scaling"] = LLAMA3_1_ROPE if family == "llama3_1" else LLAMA3_2_ROPE
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s) {unknown}; expected a subset of {sorted(known)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


PRESETS: dict[str, ModelArgs] = {
    # ~0.9M parameters (~5.5 MFLOP/token for a training step): trains to >= 0.8 acc_norm on the
    # generated task in a few minutes on 2 CPU cores. Every dim is a multiple of 32 (QAT groups, float8).
    "tiny": ModelArgs(
        vocab_size=1024, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128,
        intermediate_dim=384, max_seq_len=256, rope_scaling=LLAMA3_2_ROPE,
    ),
    # ~170M parameters, Llama-shaped, for CPU decode/prefill throughput benchmarks.
    "small_150m": ModelArgs(
        vocab_size=32_000, num_layers=12, num_heads=16, num_kv_heads=4, embed_dim=1024,
        intermediate_dim=2816, max_seq_len=2048, rope_scaling=LLAMA3_2_ROPE,
    ),
    "llama3_2_1b": ModelArgs(
        vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
        intermediate_dim=8192, max_seq_len=131_072, rope_scaling=LLAMA3_2_ROPE,
    ),
    "llama3_2_3b": ModelArgs(
        vocab_size=128_256, num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072,
        intermediate_dim=8192, max_seq_len=131_072, rope_scaling=LLAMA3_2_ROPE,
    ),
    "llama3_1_8b": ModelArgs(
        vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
        intermediate_dim=14_336, max_seq_len=131_072, tie_word_embeddings=False,
        rope_scaling=LLAMA3_1_ROPE,
    ),
}


def get_preset(name: str) -> ModelArgs:
    """The :class:`ModelArgs` of a named preset; raises ``KeyError`` listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None


def build_model(preset: str | ModelArgs, **overrides) -> TransformerDecoder:
    """Build a torchtune ``TransformerDecoder`` from a preset name or :class:`ModelArgs`.

    ``overrides`` replace fields of the preset (e.g. ``max_seq_len=256``). Weights are freshly
    initialised in the default dtype on the current default device (use ``torch.device("meta")``
    as a context manager to build without memory).
    """
    args = get_preset(preset) if isinstance(preset, str) else preset
    if overrides:
        args = ModelArgs.from_dict({**args.to_dict(), **overrides})
    model = llama3_2(
        vocab_size=args.vocab_size, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, embed_dim=args.embed_dim, max_seq_len=args.max_seq_len,
        intermediate_dim=args.intermediate_dim, rope_base=args.rope_base, norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    # The builder hard-codes Llama-3.2's scaling; every layer shares one RoPE module: swap it.
    rope = build_rope(args)
    for layer in model.layers:
        layer.attn.pos_embeddings = rope
    return model


def build_rope(args: ModelArgs) -> nn.Module:
    """The RoPE module ``args`` declares: plain, or with Llama-3 frequency scaling."""
    head_dim = args.embed_dim // args.num_heads
    s = args.rope_scaling
    if s is None:
        return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=args.max_seq_len, base=args.rope_base)
    return Llama3ScaledRoPE(
        dim=head_dim, max_seq_len=args.max_seq_len, base=args.rope_base, scale_factor=s.factor,
        low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
        old_context_len=s.original_max_position_embeddings,
    )


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def init_weights(model: TransformerDecoder, std: float = 0.02) -> TransformerDecoder:
    """Initialise a decoder for pretraining from scratch (GPT-2 style), in place.

    torchtune's builders leave ``nn.Embedding`` at N(0, 1), which with tied output weights gives
    initial logits of std ~sqrt(embed_dim) and a loss far above ln(vocab). Here every linear and
    embedding weight is N(0, std) and the residual output projections N(0, std / sqrt(2 * layers)).
    """
    import math

    n_layers = len(model.layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("output_proj", "w2")) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model
