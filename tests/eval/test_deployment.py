"""deploy: one path for qat.convert, lowbit eval and lowbit bench; recorded embeddings; group sizes."""

import copy
import json

import pytest
import torch
from torch import nn

from lowbit import qat
from lowbit.eval import compile_for_cpu, deploy, deployment_of, prepare_for_inference, quantize_for_inference
from lowbit.models import build_model
from lowbit.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def qat_embeddings_ckpt(tmp_path_factory):
    """A tiny QAT checkpoint (8da4w g32) trained with ``qat.embeddings=true`` and an untied head."""
    from lowbit.recipes.runner import run_recipe
    from tests.conftest import SMALL_RUN

    out = tmp_path_factory.mktemp("qat_emb") / "run"
    run_recipe("qat_recipe", "tiny_qat", [
        *SMALL_RUN, "max_steps=2", f"output_dir={out}", "qat.embeddings=true",
        "model.overrides.tie_word_embeddings=false", "tokenizer.vocab_size=300",
    ])
    (ckpt,) = (out / "checkpoints").iterdir()
    return ckpt


def test_checkpoint_trained_with_quantized_embeddings_deploys_them_through_lowbit_eval(
        qat_embeddings_ckpt, capsys):
    from lowbit import cli

    meta = json.loads((qat_embeddings_ckpt / "lowbit.json").read_text())
    assert (meta["qat_scheme"], meta["qat_group_size"], meta["qat_embeddings"]) == ("8da4w", 32, True)
    model, _, meta = load_checkpoint(qat_embeddings_ckpt)
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    # reference: the prepared model's fake-quant forward (what training simulated)
    fake = qat.prepare(copy.deepcopy(model), "8da4w", group_size=32, embeddings=True)
    assert isinstance(fake.tok_embeddings, qat.FakeQuantEmbedding)
    with torch.no_grad():
        ref = fake(tokens)
        deployed, used = prepare_for_inference(model, meta, dtype=torch.float32)  # what `lowbit eval` runs
        out = deployed(tokens)
    assert used == "8da4w"
    assert type(deployed.tok_embeddings.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert deployment_of(deployed).quantized_embeddings == ["tok_embeddings"]
    assert torch.equal(out, ref)
    # the float model's logits differ: the embeddings really are quantized
    with torch.no_grad():
        plain = load_checkpoint(qat_embeddings_ckpt)[0](tokens)
    assert not torch.equal(plain, ref)

    assert cli.main(["eval", "--checkpoint", str(qat_embeddings_ckpt), "--tasks", "none"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "scheme: 8da4w" in line and "deployed: 8da4w(group_size=32) bfloat16" in line
    assert "quantized embeddings: tok_embeddings" in line


def test_qat_convert_and_deploy_give_the_same_model():
    torch.manual_seed(0)
    float_model = build_model("tiny", num_layers=1, tie_word_embeddings=False).eval()
    tokens = torch.randint(0, 1024, (1, 8))
    converted = qat.convert(qat.prepare(copy.deepcopy(float_model), "4w", group_size=64, embeddings=True))
    deployed = deploy(copy.deepcopy(float_model), {"qat_scheme": "4w", "qat_group_size": 64,
                                                   "qat_embeddings": True}, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(converted(tokens), deployed(tokens))
    assert deployment_of(deployed).label == "4w(group_size=64)"


def _smollm2_widths():
    # SmolLM2-135M's widths (embed 576, intermediate 1536, 9 heads / 3 KV heads), one layer
    torch.manual_seed(0)
    return build_model("tiny", num_layers=1, embed_dim=576, intermediate_dim=1536, num_heads=9,
                       num_kv_heads=3, vocab_size=64).eval()


def test_group_size_is_the_largest_that_divides_the_widths():
    from torchao.quantization import Int4TilePackedTo4dTensor  # noqa: F401 (the opaque CPU layout)

    model = quantize_for_inference(_smollm2_widths(), "4w")
    dep = deployment_of(model)
    assert dep.label == "4w(group_size=64)" and dep.float_linears == []
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert len(linears) == len(dep.quantized_linears) == 7
    for m in linears:  # each weight really is 4-bit with 64-wide groups
        assert list(m.weight.block_size) == [1, 64], m
    assert deployment_of(deploy(_smollm2_widths(), "8da4w")).label == "8da4w(group_size=32)"
    assert deployment_of(deploy(build_model("tiny", num_layers=1), "4w")).label == "4w(group_size=128)"


def test_a_mostly_float_deployment_is_refused_naming_a_layer():
    model = _smollm2_widths()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"4w\(group_size=128\): 6 of 7 linear layers would stay float "
                                         r"\(e.g. 'layers.0.attn.q_proj', in_features 576"):
        deploy(model, "4w", group_size=128)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    assert not qat.fake_quant_modules(model)


def test_bench_row_is_labelled_with_the_group_size_used():
    from lowbit.eval.bench import bench_rows

    rows, _ = bench_rows(_smollm2_widths(), ["4w"], modes=("eager",), prompt_len=4, decode_tokens=2,
                         repeats=1, profile=False, log=lambda *a: None)
    assert rows[0]["scheme"] == "4w(group_size=64)"


def test_lowbit_eval_exports():
    assert callable(compile_for_cpu) and callable(quantize_for_inference) and callable(deploy)


def test_deploy_bad_input():
    with pytest.raises(ValueError, match="unknown inference scheme 'int3'"):
        deploy(_smollm2_widths(), "int3")
    prepared = qat.prepare(build_model("tiny", num_layers=1), "8w")
    with pytest.raises(ValueError, match="prepared with 8w; cannot deploy it as '4w'"):
        deploy(prepared, "4w")
    with pytest.raises(ValueError, match="tied"):
        deploy(build_model("tiny", num_layers=1), {"qat_scheme": "8w", "qat_embeddings": True})


def test_ggml_schemes_deploy_as_their_llama_cpp_simulation():
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=1).eval()
    tokens = torch.randint(0, 1024, (1, 8))
    ref = qat.prepare(copy.deepcopy(model), "q4_0")
    deployed = deploy(model, "q4_0")
    assert deployment_of(deployed).label == "q4_0" and deployment_of(deployed).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(deployed(tokens), ref(tokens))
    with pytest.raises(ValueError, match="blocks of 32"):
        deploy(build_model("tiny", num_layers=1), "q8_0", group_size=64)
