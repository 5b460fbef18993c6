"""lowbit: low-precision training of language models (QAT, float8, low-bit optimizers), handed to CPU
inference. docs/design.md in the repository describes the layout, the flow of one model and the numerics
contracts."""

from lowbit import _torchao

_torchao.install()

__version__ = "0.1.0"
