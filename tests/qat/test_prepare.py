"""prepare / convert / enable_fake_quant: keys, selection, errors, meta device, tied embeddings, LoRA,
compile."""

import copy
import logging

import pytest
import torch
from torch import nn

from lowbit import qat
from lowbit.models import build_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 64)
        self.a = nn.Linear(64, 48)
        self.odd = nn.Linear(48, 24)  # 48 % 32 != 0: does not fit 8da4w(32)
        self.head = nn.Linear(24, 11, bias=False)  # 24 % 32 != 0

    def forward(self, idx):
        return self.head(torch.relu(self.odd(torch.relu(self.a(self.emb(idx))))))


def test_state_dict_keys_and_values_identical():
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qat.prepare(m, "8da4w", embeddings=True)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = Net()
    fresh.load_state_dict(after)  # a QAT checkpoint loads into the plain float model


def test_skipped_layers_one_log_line_and_left_float_by_convert(caplog):
    m = Net()
    with caplog.at_level(logging.WARNING, logger="lowbit.qat"):
        qat.prepare(m, "8da4w", group_size=32)
    lines = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert len(lines) == 1 and "odd" in lines[0] and "head" in lines[0] and "2 layer(s)" in lines[0]
    assert isinstance(m.a, qat.FakeQuantLinear)
    assert type(m.odd) is nn.Linear and type(m.head) is nn.Linear and type(m.emb) is nn.Embedding
    qat.convert(m)
    assert type(m.a.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(m.odd.weight) is nn.Parameter and type(m.head.weight) is nn.Parameter


def test_group_size_8_covers_more():
    m = Net()
    qat.prepare(m, "8da4w", group_size=8)
    assert all(isinstance(getattr(m, n), qat.FakeQuantLinear) for n in ("a", "odd", "head"))


def test_filter_fn():
    m = Net()
    qat.prepare(m, "8w", filter_fn=lambda mod, fqn: fqn != "a")
    assert type(m.a) is nn.Linear and isinstance(m.odd, qat.FakeQuantLinear)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown QAT scheme 'int3'"):
        qat.prepare(Net(), "int3")
    for g in (0, -32, 48, 2.0):
        with pytest.raises(ValueError, match="group_size must be a positive power of two"):
            qat.prepare(Net(), "8da4w", group_size=g)
    with pytest.raises(ValueError, match="group_size must be None"):
        qat.get_scheme("8w", 32)
    with pytest.raises(ValueError, match="32, 64, 128"):
        qat.get_scheme("4w", 256)
    with pytest.raises(ValueError, match="unknown ranges_init 'best'; choose one of minmax, mse"):
        qat.prepare(Net(), "8da4w", group_size=32, learn_ranges=True, ranges_init="best")
    with pytest.raises(ValueError, match="never prepared"):
        qat.convert(Net())
    with pytest.raises(ValueError, match="no fake-quant modules"):
        qat.enable_fake_quant(Net(), False)
    m = qat.prepare(Net(), "8w")
    with pytest.raises(ValueError, match="already prepared.*scheme 8w"):
        qat.prepare(m, "8da4w")


def test_schemes_name_their_torchao_configs():
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    c = qat.get_scheme("8da4w", 64).inference_config()
    assert isinstance(c, Int8DynamicActivationIntxWeightConfig)
    assert c.weight_dtype == torch.int4 and c.weight_granularity == PerGroup(64)
    c = qat.get_scheme("4w", 32).inference_config()
    assert isinstance(c, Int4WeightOnlyConfig) and c.group_size == 32 and c.int4_packing_format == "opaque"
    assert isinstance(qat.get_scheme("8w").inference_config(), Int8WeightOnlyConfig)
    assert isinstance(qat.get_scheme("8da8w").inference_config(), Int8DynamicActivationInt8WeightConfig)
    assert qat.SCHEMES == ("8da4w", "4w", "8w", "8da8w", "8da3w", "8da2w", "3w", "2w", "q4_0", "q8_0")
    with pytest.raises(ValueError, match="'q4_0' simulates llama.cpp's Q4_0 format.*lowbit export --to gguf"):
        qat.get_scheme("q4_0").inference_config()
    assert qat.get_scheme("8da4w").group_size == 32 and qat.get_scheme("4w").group_size == 128
    from torchao.quantization import IntxWeightOnlyConfig

    for name, bits in (("8da3w", 3), ("8da2w", 2)):
        c = qat.get_scheme(name, 16).inference_config()
        assert isinstance(c, Int8DynamicActivationIntxWeightConfig)
        assert c.weight_dtype == getattr(torch, f"int{bits}") and c.weight_granularity == PerGroup(16)
    for name, bits in (("3w", 3), ("2w", 2)):
        c = qat.get_scheme(name).inference_config()
        assert isinstance(c, IntxWeightOnlyConfig) and c.weight_dtype == getattr(torch, f"int{bits}")
        assert c.granularity == PerGroup(32) and qat.get_scheme(name).activation is None


def test_enable_fake_quant_switches_to_plain_float():
    torch.manual_seed(0)
    m = Net()
    ref = copy.deepcopy(m)
    idx = torch.randint(0, 11, (3, 5))
    qat.prepare(m, "8da4w", group_size=8, embeddings=True)
    with torch.no_grad():
        assert not torch.equal(m(idx), ref(idx))
        qat.enable_fake_quant(m, False)
        assert torch.equal(m(idx), ref(idx))
        qat.enable_fake_quant(m, True)
        assert not torch.equal(m(idx), ref(idx))


def test_gradients_flow_straight_through():
    torch.manual_seed(0)
    m = qat.prepare(Net(), "8da4w", group_size=8)
    idx = torch.randint(0, 11, (4, 6))
    m(idx).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_meta_device_prepare_and_convert_error():
    with torch.device("meta"):
        m = build_model("tiny")
    qat.prepare(m, "8da4w")
    assert all(not isinstance(mod, nn.Linear) or isinstance(mod, qat.FakeQuantLinear)
               for mod in m.modules())
    with pytest.raises(ValueError, match="meta device"):
        qat.convert(m)


def test_tied_embeddings_with_embeddings_true_fails_clearly():
    m = build_model("tiny", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied word embeddings"):
        qat.prepare(m, "8da4w", embeddings=True)
    # untied: works, and embedding + linears are exact against convert
    torch.manual_seed(0)
    m = build_model("tiny", tie_word_embeddings=False)
    qat.prepare(m, "8da4w", embeddings=True)
    assert isinstance(m.tok_embeddings, qat.FakeQuantEmbedding) and isinstance(m.output, qat.FakeQuantLinear)
    tok = torch.randint(0, m.tok_embeddings.num_embeddings, (2, 9))
    with torch.no_grad():
        a = m(tok)
        b = qat.convert(copy.deepcopy(m))(tok)
    assert torch.equal(a, b)


def _tiny_lora():
    from torchtune.models.llama3_2 import lora_llama3_2

    return lora_llama3_2(
        lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64,
        intermediate_dim=128, lora_rank=4, lora_alpha=8.0,
    )


def test_lora_merged_weight_is_fake_quantized_and_matches_deployment():
    """Adapters are fake-quantized as part of W + (alpha/r) B A, the weight that is deployed."""
    from torchtune.modules.peft import get_merged_lora_ckpt, set_trainable_params

    torch.manual_seed(0)
    m = _tiny_lora()
    for mod in m.modules():  # non-zero B so the adapters matter
        if hasattr(mod, "lora_b"):
            nn.init.normal_(mod.lora_b.weight, std=0.05)
    keys = list(m.state_dict())
    qat.prepare(m, "8da4w", group_size=32)
    assert list(m.state_dict()) == keys
    lora_layers = [mod for mod in m.modules() if isinstance(mod, qat.FakeQuantLoRALinear)]
    assert len(lora_layers) == 2 * 6  # per layer: q, v, output_proj, w1, w2, w3
    assert sum(isinstance(mod, qat.FakeQuantLinear) for mod in m.modules()) == 2  # k_proj per layer
    tok = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        a = m(tok)
    # deployment path: merge with torchtune into a plain llama3_2, then PTQ with the same scheme
    from torchtune.models.llama3_2 import llama3_2

    merged = get_merged_lora_ckpt({k: v.clone() for k, v in m.state_dict().items()}, rank=4, alpha=8.0)
    plain = llama3_2(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                     max_seq_len=64, intermediate_dim=128)
    plain.load_state_dict(merged)
    deployed = qat.convert_checkpoint_model(plain, "8da4w", 32)
    with torch.no_grad():
        b = deployed(tok)
        c = qat.convert(copy.deepcopy(m))(tok)
    assert torch.equal(a, b) and torch.equal(a, c)
    # training: only adapters trainable; they get STE gradients, the base stays frozen
    set_trainable_params(m, {n for n, _ in m.named_parameters() if "lora_" in n})
    m(tok).float().square().mean().backward()
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_dropout_rejected():
    from torchtune.modules.peft import LoRALinear

    m = nn.Sequential(LoRALinear(64, 32, rank=4, alpha=8.0, dropout=0.1))
    with pytest.raises(ValueError, match="'0'.*dropout"):
        qat.prepare(m, "8da4w")


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    qat.prepare(lin, "8da4w", group_size=32)
    x = torch.randn(4, 64)
    eager_y = lin(x)
    eager_y.sum().backward()
    eager_g = lin[0].weight.grad.clone()
    lin.zero_grad()
    compiled = torch.compile(lin, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    # inductor may fuse (x * (1/s)) differently; results agree to rounding, and the graph has no breaks
    torch.testing.assert_close(y, eager_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin[0].weight.grad, eager_g, rtol=1e-4, atol=1e-5)
