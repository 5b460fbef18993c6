"""compile_for_cpu: regional compilation of decoder layers, the Xeon flags apply to this model only,
compiler errors."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import lowbit.eval.compile as lc
from lowbit.eval.compile import CPU_INDUCTOR_FLAGS, CompilerNotFoundError, compile_for_cpu
from lowbit.eval.generate import generate
from lowbit.eval.quantize import quantize_for_inference
from lowbit.models import build_model


def _flag_values():
    import torch._inductor.config as cfg

    return {
        k: (getattr(cfg.cpp, k[4:]) if k.startswith("cpp.") else getattr(cfg, k)) for k in CPU_INDUCTOR_FLAGS
    }


def test_compiled_quantized_generation_matches_eager_and_flags_are_scoped(monkeypatch):
    """4w tiny model: per shape one layer graph shared by both decoder layers (the prefill region, the
    decode library) and one head graph; generation equal to eager; the flags seen by Inductor, then
    restored."""
    from torch._inductor import compile_fx

    torch.manual_seed(0)
    model = quantize_for_inference(build_model("tiny", num_layers=2).eval(), "4w")
    eager = copy.deepcopy(model)
    before = _flag_values()
    seen = []
    real = compile_fx._compile_fx_inner

    def spy(*args, **kwargs):  # runs inside Inductor's config.patch(options) for this model
        seen.append(_flag_values())
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "_compile_fx_inner", spy)
    compiled = compile_for_cpu(model)
    assert compiled is model  # the decoder layers are compiled in place
    # torchao subclasses kept (parametrizations would give each layer its own class, and its own compile)
    assert not parametrize.is_parametrized(model.layers[0].attn.q_proj, "weight")
    prompt = torch.randint(0, 1024, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = generate(compiled, prompt, 5)
        assert torch.equal(out, generate(eager, prompt, 5))
    # layer prefill, head prefill, head decode (torch.compile); the layers' decode step (one AOTInductor
    # library for both layers: its weights are inputs, so there is nothing to freeze)
    aot = {**CPU_INDUCTOR_FLAGS, "freezing": False}
    assert len(seen) == 4 and sorted(v == aot for v in seen) == [False] * 3 + [True], seen
    assert all(v == CPU_INDUCTOR_FLAGS for v in seen if v != aot), seen
    assert _flag_values() == before  # nothing left set globally
    assert not any(before.values())


def test_missing_compiler_gives_clear_error(monkeypatch):
    model = torch.nn.Linear(4, 4)
    monkeypatch.setenv("CXX", "/nonexistent/bin/g++")
    with pytest.raises(CompilerNotFoundError, match="without --compile"):
        compile_for_cpu(model)
    monkeypatch.delenv("CXX")

    def no_compiler():
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(CompilerNotFoundError, match="without --compile"):
        lc.find_cpp_compiler()


def test_bad_flags_and_inputs():
    with pytest.raises(ValueError, match="cpp.no_such_flag"):
        compile_for_cpu(torch.nn.Linear(4, 4), flags={"cpp.no_such_flag": True})
    with pytest.raises(TypeError, match="nn.Module"):
        compile_for_cpu(lambda x: x)


def test_compile_raises_dynamo_recompile_limit_for_many_models():
    """Several compiled models share torchtune's forward code object; the default limit (8) would make
    dynamo fall back to eager silently after a few models."""
    import torch

    from lowbit.eval.compile import RECOMPILE_LIMIT, compile_for_cpu

    # torch's own config.patch restores the setting afterwards (pytest's monkeypatch deletes it).
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_for_cpu(torch.nn.Linear(4, 4))
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    with torch._dynamo.config.patch(recompile_limit=1000):
        compile_for_cpu(torch.nn.Linear(4, 4))
        assert torch._dynamo.config.recompile_limit == 1000


def test_two_compiled_schemes_in_one_process_each_match_eager():
    """The decoder layers of every compiled model share one code object; the guards must keep a 4w
    layer's graph from running an 8w layer (a guard filter that skipped them did exactly that)."""
    torch.manual_seed(0)
    base = build_model("tiny", num_layers=2).eval()
    prompt = torch.randint(0, 1024, (1, 5), generator=torch.Generator().manual_seed(1))
    models = {s: quantize_for_inference(copy.deepcopy(base), s) for s in ("4w", "8w")}
    eager = {s: copy.deepcopy(m) for s, m in models.items()}
    compiled = {s: compile_for_cpu(m, flags={"max_autotune": False}) for s, m in models.items()}
    with torch.no_grad():
        for s in ("4w", "8w", "4w"):
            assert torch.equal(generate(compiled[s], prompt, 4), generate(eager[s], prompt, 4)), s


def test_fused_decode_attention_and_head_equal_the_matmul_forms():
    """The one-query attention and the one-row head that compile_for_cpu writes as reductions compute
    what SDPA (masked, GQA-expanded keys) and the matmul compute, in float64 here."""
    from torchtune.modules.attention_utils import _sdpa_or_flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, n, 16, generator=g, dtype=torch.float64) for n in (1, 9, 9))
    mask = torch.rand(2, 1, 9, generator=g) < 0.7
    mask[:, :, 0] = True  # every row attends somewhere
    sdpa = _sdpa_or_flex_attention()
    fused = lc._fused_decode_attention(sdpa)
    got = fused(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
    want = sdpa(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # the reduction runs in fp32
    q2 = torch.randn(2, 6, 3, 16, dtype=torch.float64, generator=g)  # longer queries go to SDPA itself
    m2 = torch.ones(2, 3, 9, dtype=torch.bool)
    assert torch.equal(fused(q2, k, v, mask=m2, dropout_p=0.0, is_causal=False),
                       sdpa(q2, k, v, mask=m2, dropout_p=0.0, is_causal=False))

    model = build_model("tiny", num_layers=1).eval()
    owner = lc._head_weight_owner(model)
    assert owner is model.tok_embeddings  # tiny ties its head to the embedding
    h = torch.randn(2, 1, model.norm.scale.numel(), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(lc._fused_decode_unembed(model.norm, owner)(h), model.unembed(h),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~30 s of dynamic-shape compiles
def test_evaluate_compiled_scores_like_eager(tmp_path):
    """lm-eval through ``evaluate(compile=True)``: regional compilation with dynamic shapes over the
    scorer's packed rows chooses what the eager model chooses, item by item."""
    from lowbit.data import generate_corpus, generate_hellaswag, write_jsonl
    from lowbit.eval import evaluate
    from lowbit.models import init_weights
    from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer

    torch.manual_seed(0)
    model = init_weights(build_model("tiny", num_layers=2), std=0.2).eval()
    tok = load_tokenizer(train_bpe_tokenizer(generate_corpus(256), 1024, tmp_path / "tok"))
    task = write_jsonl(generate_hellaswag(8, seed=3), tmp_path / "t.jsonl")
    runs = {c: evaluate(model=copy.deepcopy(model), tokenizer=tok, task_file=task, scheme="none", compile=c,
                        log_samples=True) for c in (False, True)}
    assert runs[True]["lowbit"]["compiled"]
    for eager, compiled in zip(runs[False]["samples"]["hellaswag_local"],
                               runs[True]["samples"]["hellaswag_local"], strict=True):
        assert eager["acc_norm"] == compiled["acc_norm"]
        got = [r[0] for r in compiled["filtered_resps"]]
        want = [r[0] for r in eager["filtered_resps"]]
        assert got == pytest.approx(want, abs=1e-4)
