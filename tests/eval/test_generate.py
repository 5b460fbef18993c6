"""Static-KV-cache generation equals a no-cache argmax loop; sampling; bad input."""

import pytest
import torch

from lowbit.eval.generate import Generator, generate, sample
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models import build_model


def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", num_layers=layers).eval()


@torch.no_grad()
def _no_cache_greedy(model, prompt, n):
    toks = prompt
    for _ in range(n):
        toks = torch.cat([toks, model(toks)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return toks


@pytest.mark.parametrize("scheme", [None, "4w"])
def test_greedy_generation_equals_no_cache_argmax_loop(scheme):
    model = quantize_for_inference(_model(), scheme)
    prompt = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _no_cache_greedy(model, prompt, 8)  # before generate: then the caches (and masks) are required
    out = generate(model, prompt, 8)
    assert out.shape == (2, 17) and torch.equal(out[:, :9], prompt)
    assert torch.equal(out, ref)
    # caches are reused (reset) by a second call with the same shapes: same result
    assert torch.equal(generate(model, prompt, 8), out)


@torch.no_grad()
def test_decode_step_logits_match_full_forward():
    model = _model()
    seq = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model(seq)  # (1, 12, V) without cache
    gen = Generator(model, 1, 16)
    got = [gen.prefill(seq[:, :5])]
    for i in range(5, 12):
        got.append(gen.step(seq[:, i : i + 1]))
    torch.testing.assert_close(torch.stack(got[1:], 1), full[:, 5:12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], full[:, 4], rtol=1e-4, atol=1e-4)


def test_new_cache_length_replaces_old_caches():
    model = _model(1)
    prompt = torch.randint(0, 1024, (1, 5), generator=torch.Generator().manual_seed(4))
    ref = _no_cache_greedy(model, prompt, 9)
    assert torch.equal(generate(model, prompt, 3), ref[:, :8])
    assert torch.equal(generate(model, prompt, 9), ref)  # longer: caches re-created, not kept at 8
    assert model.layers[0].attn.kv_cache.k_cache.shape[2] == 14


def test_sampling_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -5.0]])
    assert sample(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    draws = torch.cat([sample(logits.expand(400, 5), 1.0, top_k=2, generator=g) for _ in range(2)])
    assert set(draws.flatten().tolist()) == {1, 3}
    # empirical frequency ~ softmax over the top 2: p(1) = 1 / (1 + e^-0.1) = 0.525
    assert abs((draws == 1).float().mean().item() - 0.525) < 0.06
    out = generate(_model(1), torch.zeros(1, 3, dtype=torch.long), 5, temperature=0.8,
                   generator=torch.Generator().manual_seed(3))
    assert out.shape == (1, 8) and out.min() >= 0 and out.max() < 1024


def test_bad_input():
    model = _model(1)
    with pytest.raises(ValueError, match="int64"):
        generate(model, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 250, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(1, 4), -1.0)
    gen = Generator(model, 2, 8)
    with pytest.raises(ValueError, match="batch"):
        gen.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="TransformerDecoder"):
        Generator(torch.nn.Linear(2, 2), 1, 4)
