"""``Float8TrainingConfig``: which float8 recipe a ``Float8Linear`` runs, and how.

The three recipes (each a fixed choice of float8 dtype and scaling granularity per GEMM operand):

=====================  ===========================  ==============================  ==========================
recipe                 output = input @ weight.T    grad_input = grad_out @ weight  grad_weight = grad_out.T @ input
=====================  ===========================  ==============================  ==========================
``tensorwise``         e4m3 x e4m3, one scale each  e5m2 x e4m3, one scale each     e5m2 x e4m3, one scale each
``rowwise``            e4m3 per row x e4m3 per col  e4m3 per row x e4m3 per col     e4m3 per row x e4m3 per col
``rowwise_with_gw_hp`` e4m3 per row x e4m3 per col  e4m3 per row x e4m3 tensorwise  high precision (no float8)
=====================  ===========================  ==============================  ==========================

Rowwise recipes round every scale down to a power of two. Only the forward GEMM uses fast accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@dataclass(frozen=True)
class Float8TrainingConfig:
    """How ``convert_to_float8_training`` configures each ``Float8Linear``.

    Args:
        recipe: one of ``"tensorwise"``, ``"rowwise"``, ``"rowwise_with_gw_hp"`` (see the module table).
        emulate: run the same casts and scales but multiply with a float32 ``torch.mm`` instead of
            ``torch._scaled_mm`` (any device; required on CUDA GPUs older than SM89).
        enable_fsdp_float8_all_gather: with FSDP2, all-gather weights in float8 (tensorwise only); call
            ``precompute_float8_scales_for_fsdp(model)`` after each ``optimizer.step()``.
    """

    recipe: str = "tensorwise"
    emulate: bool = False
    enable_fsdp_float8_all_gather: bool = False

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown float8 recipe {self.recipe!r}; expected one of {list(RECIPES)}")
        if not isinstance(self.emulate, bool):
            raise TypeError(f"float8 option 'emulate' must be a bool, got {self.emulate!r}")
        if self.enable_fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(
                "float8 option 'enable_fsdp_float8_all_gather' needs recipe 'tensorwise' "
                f"(one scale per weight), got recipe {self.recipe!r}"
            )

    @classmethod
    def from_recipe(
        cls, recipe: str, *, emulate: bool = False, enable_fsdp_float8_all_gather: bool = False
    ) -> Float8TrainingConfig:
        """The config for a named recipe; raises ``ValueError`` naming the valid recipes."""
        return cls(recipe=recipe, emulate=emulate, enable_fsdp_float8_all_gather=enable_fsdp_float8_all_gather)

    @property
    def rowwise(self) -> bool:
        """True for the rowwise recipes (per-row/column scales, power-of-two scales, e4m3 everywhere)."""
        return self.recipe != "tensorwise"
