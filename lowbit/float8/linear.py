"""``Float8Linear``: an ``nn.Linear`` whose three GEMMs run in float8 with dynamic scaling.

The autograd function below is the whole recipe: it casts the operands of each GEMM to float8 as
``Float8TrainingConfig`` prescribes and multiplies them with ``lowbit.quant.float8.float8_mm``
(``torch._scaled_mm``, or a float32 matmul when emulating). It saves the high-precision input and
weight for backward and re-casts them there, the way the rowwise recipes need (different scaling axes
per GEMM).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.float8.config import Float8TrainingConfig
from lowbit.float8.fsdp import Float8AllGatherWeight, Float8GatheredWeight
from lowbit.quant.float8 import E4M3, cast_to_float8, float8_mm


def _cast_weight_tensorwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) e4m3 weight and its 0-d scale; a weight all-gathered in float8 by FSDP2 is used as is."""
    if isinstance(weight, Float8GatheredWeight):
        return weight._data, weight._scale
    return cast_to_float8(weight, E4M3)


def _forward_gemm(x: torch.Tensor, weight: torch.Tensor, recipe: str, emulate: bool) -> torch.Tensor:
    """output (M, N) = x (M, K) @ weight (N, K).T with both operands in e4m3."""
    rowwise = recipe != "tensorwise"
    if rowwise:
        x8, sx = cast_to_float8(x, E4M3, dim=-1, power_of_2=True)
        w8, sw = cast_to_float8(weight.t(), E4M3, dim=0, power_of_2=True)  # (K, N), scale (1, N)
    else:
        x8, sx = cast_to_float8(x, E4M3)
        w8, sw = _cast_weight_tensorwise(weight)
        w8 = w8.t()
    return float8_mm(x8, sx, w8, sw, x.dtype, use_fast_accum=True, emulate=emulate)


def _grad_input_gemm(
    go: torch.Tensor, weight: torch.Tensor, recipe: str, emulate: bool, go_dtype
) -> torch.Tensor:
    """grad_input (M, K) = grad_output (M, N) @ weight (N, K); grad_output cast to ``go_dtype``."""
    if recipe == "tensorwise":
        go8, sgo = cast_to_float8(go, go_dtype)
        w8, sw = _cast_weight_tensorwise(weight)
    elif recipe == "rowwise":
        go8, sgo = cast_to_float8(go, go_dtype, dim=-1, power_of_2=True)  # scale (M, 1)
        w8, sw = cast_to_float8(weight, E4M3, dim=0, power_of_2=True)  # scale (1, K)
    else:  # rowwise_with_gw_hp: weight tensorwise so one float8 copy serves both GEMMs
        go8, sgo = cast_to_float8(go, go_dtype, dim=-1, power_of_2=True)
        w8, sw = cast_to_float8(weight, E4M3, power_of_2=True)
    return float8_mm(go8, sgo, w8, sw, go.dtype, use_fast_accum=False, emulate=emulate)


def _grad_weight_gemm(
    go: torch.Tensor, x: torch.Tensor, recipe: str, emulate: bool, go_dtype
) -> torch.Tensor:
    """grad_weight (N, K) = grad_output (M, N).T @ x (M, K); grad_output cast to ``go_dtype``."""
    if recipe == "rowwise_with_gw_hp":
        return torch.mm(go.t(), x)
    if recipe == "tensorwise":
        go8, sgo = cast_to_float8(go, go_dtype)
        x8, sx = cast_to_float8(x, E4M3)
        return float8_mm(go8.t(), sgo, x8, sx, go.dtype, use_fast_accum=False, emulate=emulate)
    go8, sgo = cast_to_float8(go, go_dtype, dim=0, power_of_2=True)  # per output column, scale (1, N)
    x8, sx = cast_to_float8(x, E4M3, dim=0, power_of_2=True)  # per input column, scale (1, K)
    return float8_mm(go8.t(), sgo.t(), x8, sx, go.dtype, use_fast_accum=False, emulate=emulate)


class _Float8LinearFn(torch.autograd.Function):
    """``input (..., K) @ weight (N, K).T -> (..., N)`` with float8 GEMMs in forward and backward."""

    @staticmethod
    def forward(
        ctx, input: torch.Tensor, weight: torch.Tensor, recipe: str, emulate: bool, go_dtype
    ) -> torch.Tensor:
        x = input.reshape(-1, input.shape[-1])
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.emulate, ctx.go_dtype, ctx.input_shape = recipe, emulate, go_dtype, input.shape
        out = _forward_gemm(x, weight, recipe, emulate)
        return out.reshape(*input.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        go = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = _grad_input_gemm(go, weight, ctx.recipe, ctx.emulate, ctx.go_dtype).reshape(
                ctx.input_shape
            )
        if ctx.needs_input_grad[1]:
            grad_weight = _grad_weight_gemm(go, x, ctx.recipe, ctx.emulate, ctx.go_dtype)
        return grad_input, grad_weight, None, None, None


def check_float8_hardware(device: torch.device, emulate: bool, layer: str = "") -> None:
    """Raise if ``torch._scaled_mm`` cannot run on ``device`` (a CUDA GPU older than SM89) without
    emulation."""
    if emulate or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"float8 layer {layer!r}: {device} has compute capability {major}.{minor}, but float8 GEMMs "
            "(torch._scaled_mm) need SM89 or newer (Ada, Hopper); set the float8 option emulate=True"
        )


def _plain_weight_in_state_dict(module, state_dict, prefix, local_metadata):
    """Save a float8 all-gather weight wrapper as the plain tensor it wraps (e.g. for safetensors)."""
    w = state_dict.get(prefix + "weight")
    if isinstance(w, Float8AllGatherWeight):
        state_dict[prefix + "weight"] = w._tensor
    return state_dict


class Float8Linear(nn.Linear):
    """``nn.Linear`` with float8 GEMMs; parameters and state dict are exactly those of ``nn.Linear``.

    Input ``(..., in_features)`` in float32 or bfloat16; output ``(..., out_features)`` in the input's
    dtype. Weight and bias keep their dtype (float8 copies exist only inside forward/backward).
    Build it with ``Float8Linear.from_linear`` (shares the parameter objects, so an optimizer built
    before conversion keeps working) and undo it with ``to_linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config=None, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.config = config if config is not None else Float8TrainingConfig()
        self.fqn = ""  # set by convert_to_float8_training; used in error messages
        self._register_state_dict_hook(_plain_weight_in_state_dict)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Float8TrainingConfig, fqn: str = "") -> Float8Linear:
        """A ``Float8Linear`` holding the very same weight/bias ``Parameter`` objects as ``linear``."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, config=config)
        new.weight = linear.weight
        new.bias = linear.bias
        new.fqn = fqn
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the same parameters (the float8 round trip is lossless)."""
        with torch.device("meta"):
            new = nn.Linear(self.in_features, self.out_features, bias=False)
        new.weight = self.weight
        new.bias = self.bias
        new.train(self.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"float8 layer {self.fqn!r}: input has last dim {input.shape[-1]}, expected in_features="
                f"{self.in_features} (input shape {tuple(input.shape)})"
            )
        if torch.is_autocast_enabled(input.device.type):
            input = input.to(torch.get_autocast_dtype(input.device.type))
        if input.is_cuda and not self.config.emulate and not torch.compiler.is_compiling():
            check_float8_hardware(input.device, False, self.fqn)
        c = self.config
        out = _Float8LinearFn.apply(input, self.weight, c.recipe, c.emulate, c.grad_output_float8_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        c = self.config
        go = "" if c.grad_output_dtype is None else f", grad_output_dtype={c.grad_output_dtype}"
        return f"{super().extra_repr()}, recipe={c.recipe}, emulate={c.emulate}{go}"
