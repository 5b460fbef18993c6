"""Decode steps through one ahead-of-time library per distinct decoder layer (lowbit.eval.decode_step):
the same numbers as the torch.compile region, bit for bit, the KV caches updated in place, new cache
shapes, and a failed export falling back to the region."""

import copy
import logging

import pytest
import torch

import lowbit.eval.decode_step as ds
from lowbit.eval.compile import compile_for_cpu
from lowbit.eval.generate import Generator
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models import build_model


def _decode(model, prompt, steps, max_len):
    """Greedy decode; returns the logits of every step (steps, B, V) and layer 0's KV cache."""
    with torch.inference_mode():
        gen = Generator(model, prompt.shape[0], max_len)
        tok = gen.prefill(prompt).argmax(-1, keepdim=True)
        out = []
        for _ in range(steps):
            logits = gen.step(tok)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
        cache = model.layers[0].attn.kv_cache
        return torch.stack(out), cache.k_cache.clone(), cache.v_cache.clone()


@pytest.fixture(scope="module")
def models():
    """(ahead-of-time decode, torch.compile region only, eager) copies of a 2-layer 8da4w tiny model."""
    torch.manual_seed(0)
    eager = quantize_for_inference(build_model("tiny", num_layers=2).eval(), "8da4w")
    aot, region = compile_for_cpu(copy.deepcopy(eager)), copy.deepcopy(eager)
    real = ds.install
    ds.install = lambda *a: None
    try:
        compile_for_cpu(region)
    finally:
        ds.install = real
    return aot, region, eager


def test_decode_matches_the_compiled_region_bit_for_bit_with_one_library(models):
    aot, region, eager = models
    prompt = torch.randint(0, 1024, (2, 5), generator=torch.Generator().manual_seed(1))
    got, k, v = _decode(aot, prompt, 6, 16)
    want, k_ref, v_ref = _decode(region, prompt, 6, 16)
    assert torch.equal(got, want)  # logits of every step, after the caches were updated in place
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(got.argmax(-1), _decode(eager, prompt, 6, 16)[0].argmax(-1))
    calls = [layer._compiled_call_impl for layer in aot.layers]
    assert all(isinstance(c, ds.AotDecodeLayer) for c in calls)
    assert calls[0].libraries is calls[1].libraries and len(calls[0].libraries) == 1  # shared by the layers
    assert calls[0].last[2] is calls[1].last[2] and calls[0].last[2] is not False


@pytest.mark.slow  # a second AOTInductor compile (~30 s on 2 cores)
def test_new_cache_shape_gets_its_own_library(models):
    aot, region, _ = models
    libraries = aot.layers[0]._compiled_call_impl.libraries
    before = len(libraries)
    prompt = torch.randint(0, 1024, (1, 3), generator=torch.Generator().manual_seed(2))
    got, k, _ = _decode(aot, prompt, 4, 9)  # batch 1, 9 positions: new input and cache shapes
    want, k_ref, _ = _decode(region, prompt, 4, 9)
    assert torch.equal(got, want) and torch.equal(k, k_ref)
    assert len(libraries) == before + 1


def test_decode_past_the_cache_raises():
    torch.manual_seed(0)
    model = compile_for_cpu(quantize_for_inference(build_model("tiny", num_layers=1).eval(), "8da4w"))
    with torch.inference_mode():
        gen = Generator(model, 1, 4)
        tok = gen.prefill(torch.zeros(1, 3, dtype=torch.long)).argmax(-1, keepdim=True)
        gen.step(tok)  # position 3: the last one
        input_pos = torch.full((1, 1), 3, dtype=torch.long)
        with pytest.raises((RuntimeError, AssertionError)):  # the cache's bound check, compiled in
            model(tok, mask=gen.mask[input_pos], input_pos=input_pos)


def test_failed_export_falls_back_to_the_region_once(monkeypatch, caplog):
    torch.manual_seed(0)
    eager = quantize_for_inference(build_model("tiny", num_layers=2).eval(), "4w")
    model = compile_for_cpu(copy.deepcopy(eager))
    calls = []

    def broken_export(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("unsupported op in export")

    monkeypatch.setattr(torch.export, "export", broken_export)
    prompt = torch.randint(0, 1024, (1, 4), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="lowbit.eval.decode_step"):
        got = _decode(model, prompt, 3, 8)[0]
    assert "not compiled ahead of time (RuntimeError: unsupported op in export)" in caplog.text
    assert len(calls) == 1  # remembered for this key, shared by both layers: no retry every step
    assert torch.equal(got.argmax(-1), _decode(eager, prompt, 3, 8)[0].argmax(-1))
