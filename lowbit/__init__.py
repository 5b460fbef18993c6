"""lowbit: low-precision training of language models (QAT, float8, low-bit optimizers), handed to CPU inference."""

__version__ = "0.1.0"
