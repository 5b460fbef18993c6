"""lowbit: low-precision training of language models (QAT, float8, low-bit optimizers), handed to CPU inference."""

from lowbit import _torchao

_torchao.install()

__version__ = "0.1.0"
