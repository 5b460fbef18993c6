"""Low-bit optimizers: AdamW / Adam with 8-bit, 4-bit or fp8 blockwise-quantized moments.

``AdamW8bit(model.parameters(), lr=1e-4)`` is a drop-in for ``torch.optim.AdamW`` with 2 bytes of
state per parameter instead of 8 (``AdamW4bit``: 1 byte). See ``lowbit.optim.adam``.
"""

from .adam import Adam4bit, Adam8bit, AdamFp8, AdamW4bit, AdamW8bit, AdamWFp8

__all__ = ["AdamW8bit", "AdamW4bit", "AdamWFp8", "Adam8bit", "Adam4bit", "AdamFp8"]
