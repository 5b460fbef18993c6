import math

import torch
import torch.nn.functional as F
from torchtune.models.llama3_1 import llama3_1_8b
from torchtune.models.llama3_2 import llama3_2_1b, llama3_2_3b

from lowbit.models import build_model, init_weights, num_params


def test_real_presets_match_torchtune_builders():
    for name, ref in [
        ("llama3_2_1b", llama3_2_1b),
        ("llama3_2_3b", llama3_2_3b),
        ("llama3_1_8b", llama3_1_8b),
    ]:
        with torch.device("meta"):
            ours, theirs = build_model(name), ref()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }, name
    with torch.device("meta"):
        assert 1.2e9 < num_params(build_model("llama3_2_1b")) < 1.3e9


def test_init_weights_starts_near_uniform_loss():
    torch.manual_seed(0)
    model = init_weights(build_model("tiny"))
    x = torch.randint(0, 1024, (2, 64))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - math.log(1024)) < 0.1
