"""FSDP2 float8 all-gather for the tensorwise recipe.

With ``Float8TrainingConfig(enable_fsdp_float8_all_gather=True)`` each ``Float8Linear`` weight becomes a
``Float8AllGatherWeight``: a wrapper around the high-precision weight that FSDP2 (``fully_shard``) shards
like any tensor, but all-gathers as float8 bytes (1 B/element instead of 2 or 4) through FSDP2's
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` extension. The gathered weight is a
``Float8GatheredWeight`` (float8 data + its tensorwise scale) that ``Float8Linear`` multiplies directly,
so the result is bit-identical to casting the full weight on one device.

The scale needs the amax of the *whole* weight. ``precompute_float8_scales_for_fsdp(model)`` computes it
for every weight with one all-reduce; call it after each ``optimizer.step()``. A weight changed since its
scale was computed (its version counter moved) falls back to an all-reduce of its own amax at all-gather
time, so a missed call costs speed, never correctness.

The bytes travel as ``uint8`` (the gloo backend has no float8 dtypes; NCCL moves the same bytes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from lowbit.quant.float8 import E4M3, amax_to_scale, tensor_amax, to_float8_saturated

aten = torch.ops.aten

# Ops FSDP2 applies to the sharded local tensor (chunk, pad, copy, move) that must keep the wrapper.
_KEEP_WRAPPER = {
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.copy_.default,
    aten.view.default,
    aten.as_strided.default,
    aten._to_copy.default,
    aten._pin_memory.default,
    aten.split.Tensor,
    aten.clone.default,
    aten.detach.default,
}


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (any shape, float32/bfloat16) that FSDP2 all-gathers in float8 (e4m3)."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, precomputed: tuple[torch.Tensor, int] | None = None):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )

    def __init__(self, tensor: torch.Tensor, precomputed: tuple[torch.Tensor, int] | None = None):
        self._tensor = tensor
        self._precomputed = precomputed  # (scale, weight version it was computed at)

    def __repr__(self):
        return f"Float8AllGatherWeight({self._tensor})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_WRAPPER:
            return out
        return pytree.tree_map_only(torch.Tensor, cls, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_tensor"])

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """Cast this shard with the full weight's scale; all-gather its bytes, pass the scale as metadata."""
        if self._precomputed is not None and self._precomputed[1] == self._tensor._version:
            scale = self._precomputed[0]
        else:
            amax = _amax_f32(self._tensor)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
            scale = amax_to_scale(amax, E4M3)
        data = to_float8_saturated(self._tensor, scale, E4M3)
        return (data.view(torch.uint8),), (scale,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,) = all_gather_outputs
        (scale,) = metadata
        if out is not None:  # FSDP reuses the unsharded parameter: its _data already views the output
            out._scale = scale
            return None
        return Float8GatheredWeight(data.view(E4M3), scale, param_dtype), (data,)


class Float8GatheredWeight(torch.Tensor):
    """An all-gathered weight already in float8: ``_data`` (e4m3, weight shape) and 0-d ``_scale``.

    Presents as a ``param_dtype`` tensor of the weight's shape; ``Float8Linear`` reads ``_data`` and
    ``_scale`` directly. Other ops see the dequantized value (``_data / _scale``).
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=dtype, layout=data.layout, device=data.device, requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self._data, self._scale = data, scale

    def __repr__(self):
        return f"Float8GatheredWeight(data={self._data}, scale={self._scale}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func in (aten.detach.default, aten.alias.default, aten.view.default, aten.as_strided.default,
                    aten._unsafe_view.default):
            t = args[0]
            return cls(func(t._data, *args[1:], **(kwargs or {})), t._scale, t.dtype)
        args, kwargs = pytree.tree_map_only(
            cls, lambda t: (t._data.to(torch.float32) / t._scale).to(t.dtype), (args, kwargs or {})
        )
        return func(*args, **kwargs)

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Float8GatheredWeight(inner["_data"], inner["_scale"], dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl


def wrap_weight(linear: nn.Linear) -> None:
    """Make ``linear.weight`` a ``Float8AllGatherWeight`` parameter (before ``fully_shard``)."""
    w = linear.weight
    linear.weight = nn.Parameter(Float8AllGatherWeight(w.data), requires_grad=w.requires_grad)


def unwrap_weight(linear: nn.Linear) -> None:
    """Undo :func:`wrap_weight` (plain parameter with the same values); no-op for a plain weight."""
    w = linear.weight
    if isinstance(w, Float8AllGatherWeight):
        linear.weight = nn.Parameter(w._tensor, requires_grad=w.requires_grad)


def _amax_f32(t: torch.Tensor) -> torch.Tensor:
    """max(|t|) as a 0-d float32 (exact for float32/bfloat16 input); 0 for an empty shard."""
    return tensor_amax(t).to(torch.float32) if t.numel() else t.new_zeros((), dtype=torch.float32)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # DTensor -> its shard


@torch.no_grad()
def precompute_float8_scales_for_fsdp(model: nn.Module) -> None:
    """Compute every float8 all-gather weight's tensorwise scale with one all-reduce (MAX) of the amaxes.

    Call after each ``optimizer.step()`` (and once before the first forward, optionally). Scales are
    ``amax_to_scale(amax of the full weight)``: identical to casting the unsharded weight.
    """
    weights = [p for p in model.parameters() if isinstance(_local(p), Float8AllGatherWeight)]
    if not weights:
        return
    shards = [_local(w)._tensor for w in weights]
    amax = torch.stack([_amax_f32(s) for s in shards])
    if dist.is_initialized():
        mesh = getattr(weights[0], "device_mesh", None)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group() if mesh is not None else None)
    scales = amax_to_scale(amax, E4M3)
    for w, s, scale in zip(weights, shards, scales):
        _local(w)._precomputed = (scale, s._version)
