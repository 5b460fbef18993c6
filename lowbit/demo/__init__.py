"""The demo behind ``lowbit demo`` / ``make demo``: pretrain a tiny model offline, evaluate it with
lm-eval, run one arm per feature, write one report.

``run.py`` drives it; each arm is its own module: ``optim_arm`` (AdamW vs the low-bit AdamWs),
``qat_arm`` (float vs PTQ vs QAT), ``float8_arm`` (loss parity) and ``speed_arm`` (CPU throughput).
The arms are built only from lowbit's public pieces (recipes, eval), which never import the demo.
"""

from lowbit.demo.run import ARMS, DEFAULT_ARMS, run_demo

__all__ = ["ARMS", "DEFAULT_ARMS", "run_demo"]
