"""LoRA adapters for QAT: wrap a decoder's linears in torchtune ``LoRALinear``, and merge them back.

QAT with LoRA trains only the adapters (and, with learned ranges, the scales) while the fake quant sees the
merged weight ``W + (alpha / rank) B A`` (:class:`~lowbit.qat.modules.FakeQuantLoRALinear`), the weight
that is deployed. Checkpoints hold that merged weight as a plain float model
(:func:`merge_lora_state_dict`), so ``lowbit eval`` deploys them like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.qat.modules import _lora_cls, merge_lora_weight

# torchtune's names for a Llama block's linears (attention, then feed-forward)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight")


def add_lora(model: nn.Module, targets: list[str] | tuple[str, ...], rank: int, alpha: float) -> list[str]:
    """Replace, in place, each ``nn.Linear`` whose attribute name is in ``targets`` by a torchtune
    ``LoRALinear`` (no dropout) holding the same ``weight`` / ``bias`` Parameters; ``lora_b`` starts at
    zero, so the model's function is unchanged. Returns the replaced layers' names.

    Raises:
        ValueError: a name in ``targets`` matches no ``nn.Linear`` of the model.
    """
    lora_cls = _lora_cls()
    found = [(fqn, m) for fqn, m in model.named_modules()
             if type(m) is nn.Linear and fqn.rpartition(".")[2] in targets]
    missing = sorted(set(targets) - {fqn.rpartition(".")[2] for fqn, _ in found})
    if missing:
        names = sorted({fqn.rpartition(".")[2] for fqn, m in model.named_modules() if type(m) is nn.Linear})
        raise ValueError(f"no linear layer is called {missing} (the model's linears: {names})")
    for fqn, lin in found:
        lora = lora_cls(lin.in_features, lin.out_features, rank=rank, alpha=alpha, dropout=0.0,
                        use_bias=lin.bias is not None)
        lora.to(device=lin.weight.device, dtype=lin.weight.dtype)
        lora.weight = lin.weight
        if lin.bias is not None:
            lora.bias = lin.bias
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, lora)
    return [fqn for fqn, _ in found]


@torch.no_grad()
def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], rank: int, alpha: float) -> dict:
    """A plain float state dict: each adapted ``X.weight`` becomes ``W + (alpha / rank) B A`` (the value
    the fake quant saw, bit for bit) and the ``X.lora_a`` / ``X.lora_b`` entries are dropped."""
    out = {k: v for k, v in state_dict.items() if not k.endswith(ADAPTER_SUFFIXES)}
    for key in state_dict:
        if key.endswith(".lora_a.weight"):
            layer = key.removesuffix(".lora_a.weight")
            out[f"{layer}.weight"] = merge_lora_weight(state_dict[f"{layer}.weight"], state_dict[key],
                                                       state_dict[f"{layer}.lora_b.weight"], rank, alpha)
    return out
