"""``Float8TrainingConfig``: which float8 recipe a ``Float8Linear`` runs, and how.

The three recipes (each a fixed choice of float8 dtype and scaling granularity per GEMM operand):

=====================  ======================  =========================  ==========================
recipe                 output = x @ w.T        grad_input = go @ w        grad_weight = go.T @ x
=====================  ======================  =========================  ==========================
``tensorwise``         e4m3 x e4m3, 1 scale    e5m2 x e4m3, 1 scale each  e5m2 x e4m3, 1 scale each
                       each
``rowwise``            e4m3 per row x e4m3     e4m3 per row x e4m3 per    e4m3 per row x e4m3 per col
                       per col                 col
``rowwise_with_gw_hp`` e4m3 per row x e4m3     e4m3 per row x e4m3        high precision (no float8)
                       per col                 tensorwise
=====================  ======================  =========================  ==========================

(x: the input, w: the weight, go: grad_output.)

Rowwise recipes round every scale down to a power of two. Only the forward GEMM uses fast accumulation.

``grad_output_dtype`` overrides the grad_output column (torchao: ``CastConfig(target_dtype=...)`` on the
grad_output casts). ``"e5m2"`` with a rowwise recipe keeps gradients that are small next to their row's
largest one: e4m3 spans ~2^18 below a row's max, e5m2 ~2^32. On the demo's tiny model rowwise ended
18% above the no-float8 loss after 800 steps with e4m3 grad_output and 2% below it with e5m2
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.float8 import E4M3, E5M2

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FLOAT8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


@dataclass(frozen=True)
class Float8TrainingConfig:
    """How ``convert_to_float8_training`` configures each ``Float8Linear``.

    Args:
        recipe: one of ``"tensorwise"``, ``"rowwise"``, ``"rowwise_with_gw_hp"`` (see the module table).
        emulate: run the same casts and scales but multiply with a float32 ``torch.mm`` instead of
            ``torch._scaled_mm`` (any device; required on CUDA GPUs older than SM89).
        enable_fsdp_float8_all_gather: with FSDP2, all-gather weights in float8 (tensorwise only); call
            ``precompute_float8_scales_for_fsdp(model)`` after each ``optimizer.step()``.
        grad_output_dtype: ``"e4m3"`` or ``"e5m2"`` for grad_output in the backward GEMMs; None keeps
            the recipe's own (e5m2 for tensorwise, e4m3 for the rowwise recipes, as torchao).
    """

    recipe: str = "tensorwise"
    emulate: bool = False
    enable_fsdp_float8_all_gather: bool = False
    grad_output_dtype: str | None = None

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown float8 recipe {self.recipe!r}; expected one of {list(RECIPES)}")
        if not isinstance(self.emulate, bool):
            raise TypeError(f"float8 option 'emulate' must be a bool, got {self.emulate!r}")
        if self.grad_output_dtype is not None and self.grad_output_dtype not in FLOAT8_DTYPES:
            raise ValueError(
                f"float8 option 'grad_output_dtype' must be one of {list(FLOAT8_DTYPES)} or None, "
                f"got {self.grad_output_dtype!r}"
            )
        if self.enable_fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(
                "float8 option 'enable_fsdp_float8_all_gather' needs recipe 'tensorwise' "
                f"(one scale per weight), got recipe {self.recipe!r}"
            )

    @classmethod
    def from_recipe(
        cls,
        recipe: str,
        *,
        emulate: bool = False,
        enable_fsdp_float8_all_gather: bool = False,
        grad_output_dtype: str | None = None,
    ) -> Float8TrainingConfig:
        """The config for a named recipe; raises ``ValueError`` naming the valid recipes."""
        return cls(
            recipe=recipe,
            emulate=emulate,
            enable_fsdp_float8_all_gather=enable_fsdp_float8_all_gather,
            grad_output_dtype=grad_output_dtype,
        )

    @property
    def grad_output_float8_dtype(self) -> torch.dtype:
        """The float8 dtype grad_output is cast to in both backward GEMMs."""
        default = "e5m2" if self.recipe == "tensorwise" else "e4m3"
        return FLOAT8_DTYPES[self.grad_output_dtype or default]

    @property
    def rowwise(self) -> bool:
        """True for the rowwise recipes (per-row/column scales, power-of-two scales; e4m3 everywhere unless
        ``grad_output_dtype`` says otherwise)."""
        return self.recipe != "tensorwise"
