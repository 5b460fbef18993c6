"""lowbit.qat.gptq_init: GPTQ's weights and ranges as the start of QAT, deployed exactly."""

import copy

import pytest
import torch

from lowbit import qat
from lowbit.models import build_model
from lowbit.qat.gptq import collect_hessians, gptq_init


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", num_layers=2).eval()


def _rows(model, n=8, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.tok_embeddings.num_embeddings, (n, t), generator=g)


@pytest.mark.parametrize("scheme,g", [("8da4w", 32), ("4w", 32), ("8da3w", 16)])
def test_gptq_init_is_closer_to_float_and_deploys_exactly(scheme, g):
    float_model = _model()
    rows = _rows(float_model)
    with torch.no_grad():
        ref = float_model(rows)
    rtn = qat.prepare(copy.deepcopy(float_model), scheme, group_size=g, learn_ranges=True)
    model = qat.prepare(copy.deepcopy(float_model), scheme, group_size=g, learn_ranges=True)
    assert gptq_init(model, rows, batch_size=3) == len(qat.fake_quant_modules(model))
    with torch.no_grad():
        y, y_rtn = model(rows), rtn(rows)
        # the float weights moved (GPTQ's error feedback), the model is closer to float than RTN
        assert not torch.equal(model.layers[0].mlp.w1.weight, float_model.layers[0].mlp.w1.weight)
        assert (y - ref).pow(2).mean() < (y_rtn - ref).pow(2).mean()
        deployed = qat.convert(copy.deepcopy(model))
        y_q = deployed(rows)
    if scheme == "4w":  # the CPU int4 kernel accumulates in its own order (see test_exactness)
        assert torch.allclose(y, y_q, rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(y, y_q)


def test_hessians_are_the_input_gram_matrices_and_fake_quant_stays_on():
    model = qat.prepare(_model(), "8da4w", group_size=32, learn_ranges=True)
    rows = _rows(model, n=4)
    layers = {k: m for k, m in qat.fake_quant_modules(model).items() if k.endswith(("q_proj", "w2"))}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=k: inputs.setdefault(k, []).append(a[0]))
             for k, m in layers.items()]
    qat.enable_fake_quant(model, False)
    with torch.no_grad():
        model(rows)
    qat.enable_fake_quant(model, True)
    for h in hooks:
        h.remove()
    hess = collect_hessians(model, layers, rows, batch_size=2)
    for k, xs in inputs.items():
        x = torch.cat([t.flatten(0, -2) for t in xs]).double()
        assert torch.allclose(hess[k].double(), x.t() @ x, rtol=1e-4, atol=1e-3)
    assert all(m.fake_quant_enabled for m in qat.fake_quant_modules(model).values())


def test_gptq_init_bad_input():
    with pytest.raises(ValueError, match="no linear prepared with learned ranges"):
        gptq_init(qat.prepare(_model(), "8da4w", group_size=32), _rows(_model()))
    model = qat.prepare(_model(), "8da4w", group_size=32, learn_ranges=True)
    with pytest.raises(ValueError, match="no calibration rows"):
        gptq_init(model, torch.zeros(0, 8, dtype=torch.long))
