"""The hand-off: quantize for CPU inference, compile, and evaluate with lm-eval."""

from lowbit.eval.evaluate import acc_norm, evaluate, prepare_for_inference
from lowbit.eval.lm_eval_adapter import LowbitLM
from lowbit.models.checkpoint import load_checkpoint

__all__ = ["LowbitLM", "acc_norm", "evaluate", "load_checkpoint", "prepare_for_inference"]
