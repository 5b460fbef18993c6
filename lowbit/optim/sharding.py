"""Optimizer state for DTensor parameters (FSDP2 ``fully_shard``, HSDP, replicated, tensor parallel).

The state format is that of the *global* tensor: whether a parameter is quantized
(``numel >= min_quant_size``) and where its blocks start (every ``block_size`` elements of the
flattened global tensor) do not depend on the world size. The state tensors are DTensors on the
parameter's mesh, so ``torch.distributed.checkpoint`` saves them once and reshards them on load
(save on 2 ranks, load on 1, or the reverse), and a run gives the same result on any number of ranks.

Each parameter gets one of two plans:

- ``"local"``: each rank's shard of the parameter is a contiguous range of the flattened global
  tensor that starts on a block boundary, and that range is exactly the rank's chunk of the 1-D
  state tensors under ``Shard(0)`` (FSDP2 with the usual shapes: rows divisible among ranks and
  row-chunks a multiple of the block size). Every rank steps its own shard with no communication;
  state memory is divided by the shard count. Unquantized (small) parameters always use this plan:
  their fp32 moments have the parameter's shape and placements.
- ``"gather"``: any other layout (a shard boundary inside a block, sharding on another dim). The
  gradient and parameter are all-gathered, the state is replicated, every rank runs the step of the
  whole tensor and keeps its shard. Exact, but state memory is not divided; the parameters that fall
  back are logged once.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from .formats import StateFormat, expected_layout, init_state, is_quantized

log = logging.getLogger("lowbit")
_warned: set[str] = set()


def _chunk(length: int, parts: int, index: int) -> tuple[int, int]:
    """Range of chunk ``index`` of ``length`` split ``torch.chunk``-style into ``parts`` (as DTensor's
    Shard)."""
    size = -(-length // parts) if parts else length
    return min(index * size, length), min((index + 1) * size, length)


@lru_cache(maxsize=4096)
def _aligned(shape: tuple[int, ...], parts: int, code_per_elem: int, block_size: int) -> bool:
    """Whether every row-chunk of ``shape`` maps onto the matching chunks of the flat codes and scales."""
    n = 1
    for s in shape:
        n *= s
    row = n // shape[0] if shape and shape[0] else 0
    ncodes, nblocks = -(-n // code_per_elem), -(-n // block_size)
    for r in range(parts):
        r0, r1 = _chunk(shape[0], parts, r)
        f0, f1 = r0 * row, r1 * row
        if f0 < f1 and f0 % block_size:
            return False
        if _chunk(ncodes, parts, r) != (-(-f0 // code_per_elem), -(-f1 // code_per_elem)):
            return False
        if _chunk(nblocks, parts, r) != (f0 // block_size, -(-f1 // block_size)):
            return False
    return True


def plan(p: DTensor, fmt: StateFormat, block_size: int, min_quant_size: int) -> str:
    """``"local"`` or ``"gather"`` for DTensor parameter ``p`` (see the module docstring)."""
    if not is_quantized(p, min_quant_size):
        return "local"
    shard_dims = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if not shard_dims:
        return "local"
    if len(shard_dims) == 1 and p.placements[shard_dims[0]] == Shard(0) and p.dim() > 0:
        parts = p.device_mesh.size(shard_dims[0])
        if _aligned(tuple(p.shape), parts, 2 if fmt.name == "4bit" else 1, block_size):
            return "local"
    return "gather"


def _state_placements(p: DTensor, kind: str, quantized: bool) -> list:
    if kind == "gather":
        return [Replicate()] * p.device_mesh.ndim
    if not quantized:
        return list(p.placements)
    return [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements]


def init_dtensor_state(
    p: DTensor, kind: str, fmt: StateFormat, block_size: int, min_quant_size: int, where: str
) -> dict[str, Tensor]:
    """Fresh state for DTensor ``p``: DTensors of the global format, laid out per ``kind``."""
    quantized = is_quantized(p, min_quant_size)
    if not quantized:
        z = torch.zeros_like(p, dtype=torch.float32)
        return {"step": torch.tensor(0.0), "exp_avg": z, "exp_avg_sq": z.clone()}
    if kind == "gather" and where not in _warned:
        _warned.add(where)
        log.warning(
            "%s (shape %s, placements %s): shards do not align with %d-element blocks; its optimizer "
            "state is replicated and its step all-gathers",
            where,
            list(p.shape),
            p.placements,
            block_size,
        )
    mesh, placements = p.device_mesh, _state_placements(p, kind, quantized)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    device = p.to_local().device
    out = {"step": torch.tensor(0.0)}
    for key, (dtype, shape) in expected_layout(p, fmt, block_size, min_quant_size).items():
        length = shape[0]
        if shard_dims:  # "local": this rank's chunk of the flat state tensor
            d = shard_dims[0]
            lo, hi = _chunk(length, mesh.size(d), mesh.get_local_rank(d))
            length = hi - lo
        fresh = torch.full((length,), _fill_value(fmt, key, block_size), dtype=torch.uint8, device=device)
        fresh = fresh.view(dtype) if dtype.itemsize == 1 else torch.zeros(length, dtype=dtype, device=device)
        out[key] = DTensor.from_local(fresh, mesh, placements, run_check=False, shape=shape, stride=(1,))
    return out


@lru_cache(maxsize=16)
def _zero_codes(fmt: StateFormat, block_size: int) -> dict[str, int]:
    st = init_state(torch.zeros(8), fmt, block_size, 0)
    return {k: int(v.view(torch.uint8)[0]) for k, v in st.items() if k.endswith("_codes")}


def _fill_value(fmt: StateFormat, key: str, block_size: int) -> int:
    return _zero_codes(fmt, block_size).get(key, 0)


def _shard(full: Tensor, mesh, placements) -> DTensor:
    """This rank's part of ``full`` (the same on every rank) as a DTensor with ``placements``; local
    slicing."""
    return DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, placements
    )


def localize_loaded_state(
    st: dict, p: DTensor, fmt: StateFormat, block_size: int, min_quant_size: int
) -> dict:
    """Turn plain (full) state tensors loaded into a DTensor parameter's state into DTensors of its plan."""
    kind = plan(p, fmt, block_size, min_quant_size)
    placements = _state_placements(p, kind, is_quantized(p, min_quant_size))
    device = p.to_local().device
    return {
        k: _shard(v.to(device), p.device_mesh, placements)
        if k != "step" and isinstance(v, Tensor) and not isinstance(v, DTensor)
        else v
        for k, v in st.items()
    }


def local_views(state: dict) -> dict:
    """The state with every DTensor replaced by its local tensor (the kernels update these in place)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def write_back_shard(p: DTensor, full: Tensor) -> None:
    """Copy this rank's shard of the updated full tensor ``full`` into ``p``'s local tensor."""
    p.to_local().copy_(_shard(full, p.device_mesh, p.placements).to_local())


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this process (any optimizer; DTensor state counts its local shard)."""
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in local_views(st).values()
        if isinstance(t, Tensor)
    )
