"""Float8Converter: convert(model) + post_optimizer_hook(model), the recipe-facing shape of float8."""

import pytest
import torch
from torch import nn

from lowbit.float8 import Float8Converter, Float8Linear, Float8TrainingConfig
from lowbit.float8.fsdp import Float8AllGatherWeight


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 7))


def _step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 32)).square().sum().backward()
    opt.step()


def test_convert_swaps_the_filtered_layers():
    model = Float8Converter(Float8TrainingConfig.from_recipe("tensorwise", emulate=True)).convert(_model())
    assert [type(m).__name__ for m in model] == ["Float8Linear", "ReLU", "Float8Linear", "ReLU", "Linear"]


def test_post_optimizer_hook_precomputes_the_full_weight_scales():
    """After a step, each all-gather weight carries 448 / max|w| (float64 division, as the contract
    says) tagged with the weight's current version, so the next all-gather uses it."""
    config = Float8TrainingConfig.from_recipe("tensorwise", emulate=True, enable_fsdp_float8_all_gather=True)
    converter = Float8Converter(config, precompute_scales=True)
    model = converter.convert(_model())
    weights = [m.weight for m in model if isinstance(m, Float8Linear)]
    assert len(weights) == 2 and all(isinstance(w, Float8AllGatherWeight) for w in weights)
    seen = []
    for hook_arg in (model, [model]):  # one model or a list of model parts, as torchtitan's hook
        _step(model)
        converter.post_optimizer_hook(hook_arg)
        for w in weights:
            scale, version = w._precomputed
            expected = (448.0 / w._tensor.detach().abs().max().double()).float()
            assert scale.item() == expected.item()
            assert version == w._tensor._version
            seen.append(scale.item())
    assert seen[:2] != seen[2:]  # the second step moved the weights and the hook followed


def test_without_precompute_the_hook_leaves_the_weights_alone():
    config = Float8TrainingConfig.from_recipe("tensorwise", emulate=True, enable_fsdp_float8_all_gather=True)
    converter = Float8Converter(config)
    model = converter.convert(_model())
    _step(model)
    converter.post_optimizer_hook(model)
    assert all(m.weight._precomputed is None for m in model if isinstance(m, Float8Linear))


def test_precompute_needs_the_float8_all_gather():
    with pytest.raises(ValueError, match="precompute_float8_scales_for_fsdp.*enable_fsdp_float8_all_gather"):
        Float8Converter(Float8TrainingConfig.from_recipe("tensorwise"), precompute_scales=True)
