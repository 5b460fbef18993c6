"""Helpers of the inference side of QAT: ``keep_global_config`` (``qat.convert`` restores the global
Inductor config torchao's ``quantize_`` changes) and :class:`Int8DynActInt4Linear`, the bf16 tinygemm
int4 kernel that ``lowbit.eval.deploy`` moves ``8da4w`` / ``8da3w`` / ``8da2w`` layers onto after
``qat.convert``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lowbit.quant.affine import quant_dequant_int8_per_token_asym


@contextmanager
def keep_global_config():
    """Undo what torchao's ``set_inductor_config=True`` does to global state during ``quantize_``."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.get_config_copy()
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        inductor_config.load_config(saved)
        torch.set_float32_matmul_precision(precision)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (the default dtype if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


class Int8DynActInt4Linear(nn.Module):
    """``8da4w`` linear on the CPU tinygemm int4 kernel.

    ``y = fq8(x) @ W.T + b`` where ``fq8`` is torchao's int8 asymmetric per-token quant-dequant and
    ``W = q * scale`` (int4 symmetric per group). Shapes: x ``(..., in_features)`` bf16 ->
    ``(..., out_features)`` bf16. Buffers: ``packed`` (the ``_convert_weight_to_int4pack_for_cpu``
    layout of ``q + 8``) and ``scale_and_zero`` ``(in_features // group_size, out_features, 2)`` bf16.

    torchao 0.14.1 on x86 without its C++ extension only simulates ``8da4w`` (dequantize the whole
    int4 weight on every call); this repacks the same integers and scales into the tinygemm layout
    (``w = (q_u - 8) * scale + zero`` with ``q_u = q + 8``, ``zero = -zero_point * scale``, exact).
    """

    def __init__(self, packed: torch.Tensor, scale_and_zero: torch.Tensor, in_features: int,
                 out_features: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_intx(cls, weight, bias: torch.Tensor | None) -> Int8DynActInt4Linear:
        """Repack a torchao ``IntxUnpackedToInt8Tensor`` (int4 per-group, int8 asym per-token acts)."""
        n, k = weight.shape
        g = weight.block_size[-1]
        if weight.block_size[0] != 1 or k % g:
            raise ValueError(f"expected per-group int4 weight, got block_size {weight.block_size}")
        scale = weight.scale.reshape(n, k // g)
        zero_point = weight.zero_point.reshape(n, k // g).to(torch.int32)
        q = weight.qdata.to(torch.int32)
        if q.min() < -8 or q.max() > 7:
            raise ValueError("8da4w weight values outside the int4 range [-8, 7]")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).contiguous(), 1)
        # tinygemm dequant: (q_u - 8) * scale + zero == (q - zero_point) * scale
        zero = (-zero_point.to(torch.float32) * scale.to(torch.float32)).to(scale.dtype)
        scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scale_and_zero, k, n, g, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quant_dequant_int8_per_token_asym(x)  # torchao's numbers, a quarter of the eager op count
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).contiguous(), self.packed, self.group_size, self.scale_and_zero
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )


def swap_8da4w_to_int4pack(model: nn.Module) -> None:
    """Replace torchao ``8da4w`` linears (``out_features % 16 == 0``) by :class:`Int8DynActInt4Linear`."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            # the int4pack kernel needs out_features % 16 == 0; other layers keep torchao's path
            if (isinstance(child, nn.Linear) and isinstance(child.weight, IntxUnpackedToInt8Tensor)
                    and child.out_features % 16 == 0):
                setattr(parent, child_name, Int8DynActInt4Linear.from_intx(child.weight, child.bias))

