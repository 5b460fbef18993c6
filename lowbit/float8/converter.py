"""float8 training as a model conversion with a post-optimizer hook (the shape of torchtitan's converter).

    config = Float8TrainingConfig.from_recipe("tensorwise", enable_fsdp_float8_all_gather=True)
    converter = Float8Converter(config, precompute_scales=True)
    model = converter.convert(model)          # before fully_shard
    ...
    optimizer.step()
    converter.post_optimizer_hook(model)      # after every optimizer step

The training loop only knows ``convert`` and ``post_optimizer_hook``; what float8 needs between steps
(today: the FSDP2 all-gather scales) stays here.
"""

from __future__ import annotations

from torch import nn

from lowbit.float8.config import Float8TrainingConfig
from lowbit.float8.convert import ModuleFilter, convert_to_float8_training
from lowbit.float8.fsdp import precompute_float8_scales_for_fsdp


class Float8Converter:
    """Converts a model for float8 training and keeps it ready between optimizer steps.

    Args:
        config: the float8 recipe (``enable_fsdp_float8_all_gather`` makes FSDP2 all-gather weights as
            float8; only useful once the model is sharded with ``fully_shard``).
        precompute_scales: after each optimizer step, compute every all-gathered weight's scale with
            one all-reduce (``precompute_float8_scales_for_fsdp``) instead of one all-reduce per weight
            at all-gather time. Needs ``config.enable_fsdp_float8_all_gather``.
        module_filter_fn: which ``nn.Linear`` layers to convert (default: ``default_filter``).

    Raises:
        ValueError: ``precompute_scales`` without the float8 all-gather.
    """

    def __init__(self, config: Float8TrainingConfig, *, precompute_scales: bool = False,
                 module_filter_fn: ModuleFilter | None = None):
        if precompute_scales and not config.enable_fsdp_float8_all_gather:
            raise ValueError("float8 option 'precompute_float8_scales_for_fsdp' needs "
                             "'enable_fsdp_float8_all_gather' (there are no all-gather scales to precompute)")
        self.config = config
        self.precompute_scales = precompute_scales
        self.module_filter_fn = module_filter_fn

    def convert(self, model: nn.Module) -> nn.Module:
        """Swap the selected ``nn.Linear`` layers for ``Float8Linear`` in place; returns the model."""
        return convert_to_float8_training(model, config=self.config, module_filter_fn=self.module_filter_fn)

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        """Call after each ``optimizer.step()``: refreshes the precomputed all-gather scales."""
        if not self.precompute_scales:
            return
        for m in model if isinstance(model, list) else [model]:
            precompute_float8_scales_for_fsdp(m)
