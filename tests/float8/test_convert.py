"""convert_to_float8_training / convert_back, the filters, logging and the bad-input errors."""

import logging

import pytest
import torch
from torch import nn

from lowbit.float8 import (
    Float8Linear,
    Float8TrainingConfig,
    auto_filter,
    check_float8_hardware,
    convert_back,
    convert_to_float8_training,
    default_filter,
    is_float8_model,
)
from lowbit.models import build_model


def _tiny_untied():
    torch.manual_seed(0)
    # an untied nn.Linear output head named "output"
    return build_model("tiny", num_layers=2, tie_word_embeddings=False, max_seq_len=64)


def _linears(model):
    return {fqn: type(m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_default_filter_converts_all_but_the_output_head_and_logs(caplog):
    model = _tiny_untied()
    with caplog.at_level(logging.INFO, logger="lowbit.float8"):
        convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe("tensorwise", emulate=True))
    kinds = _linears(model)
    assert kinds.pop("output") is nn.Linear
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {Float8Linear}  # q k v o, w1 w2 w3 per layer
    assert model.layers[0].attn.q_proj.fqn == "layers.0.attn.q_proj"
    assert "converted 14 linear layers" in caplog.text and "layers.1.mlp.w2" in caplog.text
    assert "output (output head)" in caplog.text


def test_dims_not_multiple_of_16_are_skipped_with_reason(caplog):
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 40), nn.Linear(40, 16))
    with caplog.at_level(logging.INFO, logger="lowbit.float8"):
        convert_to_float8_training(model)
    assert [type(m) for m in model] == [Float8Linear, nn.Linear, nn.Linear]
    assert "1 (dims (40, 48) not multiples of 16)" in caplog.text
    assert "2 (dims (16, 40) not multiples of 16)" in caplog.text


def test_custom_filter_and_root_linear():
    model = _tiny_untied()
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn.endswith("mlp.w1"))
    assert sorted(f for f, t in _linears(model).items() if t is Float8Linear) == [
        "layers.0.mlp.w1",
        "layers.1.mlp.w1",
    ]
    root = convert_to_float8_training(nn.Linear(16, 32))
    assert type(root) is Float8Linear
    assert type(convert_back(root)) is nn.Linear


def test_auto_filter_thresholds_from_torchao_h100_tables():
    f = auto_filter("tensorwise")
    assert f(nn.Linear(4096, 14336, device="meta"), "layers.0.mlp.w1")  # Llama3-8B FFN
    assert not f(nn.Linear(4096, 1024, device="meta"), "layers.0.attn.k_proj")  # K<=4096 and N<=1024
    assert not f(nn.Linear(4096, 14336, device="meta"), "output")
    r = auto_filter("rowwise")
    assert r(nn.Linear(4096, 14336, device="meta"), "w1") and r(nn.Linear(14336, 4096, device="meta"), "w2")
    assert r(nn.Linear(4096, 4096, device="meta"), "wq")
    assert not r(nn.Linear(2048, 4096, device="meta"), "x")  # N<=4096 and K<=2048
    assert not r(nn.Linear(8192, 2048, device="meta"), "x")  # N<=2048
    # the tiny model: every layer is too small, so nothing converts, and the log says why
    model = _tiny_untied()
    convert_to_float8_training(model, module_filter_fn=auto_filter("tensorwise"))
    assert not is_float8_model(model)
    with pytest.raises(ValueError, match="recipe 'nope'"):
        auto_filter("nope")


def test_convert_back_round_trip_is_lossless():
    model = _tiny_untied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in model.named_parameters()}
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 32))
    with torch.no_grad():
        want = model(tokens)
    convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe("rowwise"))
    assert is_float8_model(model)
    assert {k: p for k, p in model.named_parameters()} == params  # same Parameter objects
    sd = model.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    with torch.no_grad():
        assert not torch.equal(model(tokens), want)  # float8 is really in the forward
    convert_back(model)
    assert not is_float8_model(model) and set(_linears(model).values()) == {nn.Linear}
    with torch.no_grad():
        assert torch.equal(model(tokens), want)
    # a plain model loads the converted model's state dict (strict) and vice versa
    fresh = _tiny_untied()
    convert_to_float8_training(fresh)
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())


def test_training_step_with_optimizer_built_before_conversion():
    model = _tiny_untied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe("tensorwise"))
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 32))
    w = model.layers[0].mlp.w1.weight
    w0 = w.detach().clone()
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    opt.step()
    assert not torch.equal(w, w0)


# ---- bad input -------------------------------------------------------------------------------------


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match=r"unknown float8 recipe 'delayed'.*tensorwise"):
        Float8TrainingConfig.from_recipe("delayed")


def test_emulate_must_be_bool():
    with pytest.raises(TypeError, match="emulate"):
        Float8TrainingConfig.from_recipe("tensorwise", emulate="yes")


def test_unknown_grad_output_dtype_is_named():
    with pytest.raises(ValueError, match=r"grad_output_dtype.*'e4m3', 'e5m2'.*'fp8'"):
        Float8TrainingConfig.from_recipe("rowwise", grad_output_dtype="fp8")


def test_fsdp_all_gather_needs_tensorwise():
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather.*rowwise"):
        Float8TrainingConfig.from_recipe("rowwise", enable_fsdp_float8_all_gather=True)


def test_config_must_be_a_float8_training_config():
    with pytest.raises(ValueError, match="Float8TrainingConfig"):
        convert_to_float8_training(nn.Linear(16, 16), config={"recipe": "tensorwise"})


def test_converting_twice_names_the_layer():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    convert_to_float8_training(model)
    with pytest.raises(RuntimeError, match="'0' is already a Float8Linear.*twice"):
        convert_to_float8_training(model)
    # even when the filter would not select it again
    with pytest.raises(RuntimeError, match="twice"):
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: False)


class _CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_filter_selecting_a_non_plain_linear_names_the_layer():
    model = nn.Sequential(nn.Linear(16, 32), _CustomLinear(32, 16))
    # the default filter leaves the subclass alone
    convert_to_float8_training(model)
    assert [type(m) for m in model] == [Float8Linear, _CustomLinear]
    model = nn.Sequential(nn.Linear(16, 32), _CustomLinear(32, 16))
    with pytest.raises(TypeError, match=r"selected layer '1' of type _CustomLinear"):
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: True)
    assert type(model[0]) is nn.Linear  # nothing was swapped before the error


def test_float8_weights_are_rejected():
    model = nn.Sequential(nn.Linear(16, 32))
    model[0].weight.data = model[0].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"layer '0' has a torch.float8_e4m3fn weight"):
        convert_to_float8_training(model)


def test_old_cuda_gpu_without_emulate_is_rejected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"'layers.0.wq'.*capability 8.0.*emulate=True"):
        check_float8_hardware(torch.device("cuda", 0), emulate=False, layer="layers.0.wq")
    check_float8_hardware(torch.device("cuda", 0), emulate=True, layer="x")  # emulation is fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_hardware(torch.device("cuda", 0), emulate=False, layer="x")  # H100 is fine
    check_float8_hardware(torch.device("cpu"), emulate=False, layer="x")


def test_default_filter_on_non_linear():
    assert not default_filter(nn.Embedding(16, 16), "tok_embeddings")
