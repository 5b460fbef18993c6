"""Token generation with torchtune's static KV cache: one prefill, then one-token decode steps.

Every decode step has the same shapes (tokens ``(B, 1)``, ``input_pos`` ``(B, 1)``, mask
``(B, 1, max_len)``) and the cache is a fixed-size buffer, so a ``torch.compile``-d model compiles the
decode step once and reuses it; the prefill compiles once per prompt length.

``model`` may be the eager model or its compiled wrapper (``compile_for_cpu(model)``); the caches are set
up on the underlying torchtune ``TransformerDecoder``.
"""

from __future__ import annotations

import torch
from torch import nn


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def setup_kv_cache(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
    """Give ``model`` static KV caches for ``batch_size`` sequences of up to ``max_len`` tokens (reset to 0).

    Re-uses existing caches of the same shape (no reallocation, so compiled graphs stay valid).
    ``dtype`` defaults to the dtype of the token embedding.
    """
    dec = _decoder(model)
    if not hasattr(dec, "setup_caches"):
        raise TypeError(
            f"model must be a torchtune TransformerDecoder (has setup_caches); got {type(dec).__name__}"
        )
    if max_len > dec.max_seq_len:
        raise ValueError(f"prompt + new tokens = {max_len} exceeds the model's max_seq_len {dec.max_seq_len}")
    dtype = dtype or dec.tok_embeddings.weight.dtype
    cache = dec.layers[0].attn.kv_cache if dec.caches_are_setup() else None
    if (
        cache is not None
        and tuple(cache.k_cache.shape[::2]) == (batch_size, max_len)
        and cache.k_cache.dtype == dtype
    ):
        dec.reset_caches()
        return
    if cache is not None:  # torchtune's setup_caches silently keeps existing caches: drop them first
        from torchtune.modules.common_utils import delete_kv_caches

        delete_kv_caches(dec)
    dec.setup_caches(batch_size, dtype, decoder_max_seq_len=max_len)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``(B, 1)`` int64 from last-position logits ``(B, V)``.

    ``temperature == 0``: greedy argmax. Otherwise sample from ``softmax(logits / temperature)``,
    restricted to the ``top_k`` largest logits if given.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class Generator:
    """Prefill + decode steps over a model with static KV caches.

    ``gen = Generator(model, batch_size=1, max_len=P + N)``; ``logits = gen.prefill(prompt)`` (prompt
    ``(B, P)`` int64 -> last-position logits ``(B, V)`` fp32); then ``logits = gen.step(tokens)`` for tokens
    ``(B, 1)``. :func:`generate` drives it; the bench times its two calls separately.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        setup_kv_cache(model, batch_size, max_len, dtype)
        self.mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))  # (L, L)
        self.pos = 0

    def reset(self) -> None:
        setup_kv_cache(self.model, self.batch_size, self.max_len)
        self.pos = 0

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        b, p = prompt.shape
        if b != self.batch_size:
            raise ValueError(f"prompt batch {b} != the cache batch size {self.batch_size}")
        if self.pos != 0:
            raise RuntimeError("prefill after decoding; call reset() first")
        if p < 1 or p >= self.max_len:
            raise ValueError(f"prompt length {p} must be in [1, {self.max_len - 1}] (max_len {self.max_len})")
        input_pos = torch.arange(p).expand(b, p)
        mask = self.mask[input_pos]  # (B, P, L)
        logits = self.model(prompt, mask=mask, input_pos=input_pos)  # (B, P, V)
        self.pos = p
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        b = tokens.shape[0]
        input_pos = torch.full((b, 1), self.pos, dtype=torch.long)
        mask = self.mask[input_pos]  # (B, 1, L)
        logits = self.model(tokens, mask=mask, input_pos=input_pos)  # (B, 1, V)
        self.pos += 1
        return logits[:, -1]


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after ``prompt`` with a static KV cache.

    Args:
        model: torchtune ``TransformerDecoder`` (eager or ``torch.compile``-d).
        prompt: ``(B, P)`` int64 token ids (all rows the same length).
        max_new_tokens: number of tokens to append (>= 1).
        temperature: 0 = greedy; > 0 samples (``top_k`` to restrict, ``generator`` for reproducibility).

    Returns:
        ``(B, P + max_new_tokens)`` int64: the prompt followed by the generated tokens.

    The KV caches stay set up on the model (the next call with the same shapes reuses them; torchtune
    then requires ``mask`` / ``input_pos`` in every forward). Remove them with
    ``torchtune.modules.common_utils.delete_kv_caches(model)`` to run plain full-sequence forwards again.
    """
    if prompt.ndim != 2 or prompt.dtype != torch.long:
        raise ValueError(
            f"prompt must be a (B, P) int64 tensor, got shape {tuple(prompt.shape)} {prompt.dtype}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, p = prompt.shape
    gen = Generator(model, b, p + max_new_tokens)
    out = [prompt]
    tok = sample(gen.prefill(prompt), temperature, top_k, generator)
    out.append(tok)
    for _ in range(max_new_tokens - 1):
        tok = sample(gen.step(tok), temperature, top_k, generator)
        out.append(tok)
    return torch.cat(out, dim=1)
