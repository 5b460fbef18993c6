"""Model presets (torchtune Llama components), checkpoint loading and tokenizers."""

from lowbit.models.presets import PRESETS, ModelArgs, build_model, get_preset, init_weights, num_params

__all__ = ["PRESETS", "ModelArgs", "build_model", "get_preset", "init_weights", "num_params"]
