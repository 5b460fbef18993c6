"""The hand-off: deploy (quantize) for CPU inference, compile, and evaluate with lm-eval."""

from lowbit.eval.compile import compile_for_cpu
from lowbit.eval.deployment import Deployment, deploy, deployment_of
from lowbit.eval.evaluate import acc_norm, evaluate, prepare_for_inference
from lowbit.eval.lm_eval_adapter import LowbitLM
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models.checkpoint import load_checkpoint

__all__ = ["Deployment", "LowbitLM", "acc_norm", "compile_for_cpu", "deploy", "deployment_of", "evaluate",
           "load_checkpoint", "prepare_for_inference", "quantize_for_inference"]
