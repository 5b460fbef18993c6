"""Quiet torchao's import on a CPU-only torch: the two warnings it logs there cannot be acted on.

torchao 0.14.1 logs, when first imported,
  * "Skipping import of cpp extensions due to incompatible torch version ..." (its prebuilt C++ ops are
    for another torch; lowbit uses none of them), and
  * "Warning: Detected no triton, ..." (no triton on CPU-only installs).
``lowbit/__init__.py`` installs this filter, so it is in place before any lowbit module imports torchao;
it drops exactly these two records and nothing else torchao logs.
"""

import logging

_NOISE = {
    "torchao": "Skipping import of cpp extensions due to incompatible torch version",
    "torchao.kernel.intmm": "Warning: Detected no triton",
}


class _DropImportNoise(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """Add the filters to torchao's two loggers (idempotent)."""
    for name, prefix in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(prefix))
