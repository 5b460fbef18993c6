"""Blockwise quantization of optimizer states: codebooks, nearest-code encode, dequantize.

A state tensor is flattened and cut into blocks of ``block_size`` elements (the last block may be
partial). Each block stores one fp32 scale (its absmax over finite values) and one code per
element. Three formats (docs/design.md, "Numerics contracts"):

- 8-bit: a signed dynamic-tree map for the first moment, an unsigned one for the second
  (256 sorted fp32 values each, codes are indices into the map).
- 4-bit: a signed dynamic-tree map (16 values) for the first moment and a zero-free linear map
  ``{1/16, ..., 16/16}`` for the second, so ``1/sqrt(v)`` never explodes; two codes per byte,
  element ``2i`` in the low nibble.
- fp8: ``float8_e4m3fn`` codes of ``x / (absmax / 448)``.

Rounding is to the exact nearest map value; an exact tie goes to the larger value (the map is
sorted ascending). Non-finite inputs are stored as the code of 0 and do not enter the absmax.
Everything here is a pure function over torch tensors, device-agnostic.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

# A block's scale is max(absmax, SCALE_FLOOR): keeps 1/scale finite for all-zero blocks while
# leaving tiny second moments (grad ~1e-8) their full relative precision.
SCALE_FLOOR = 1e-30
FP8_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# codebooks
# ---------------------------------------------------------------------------------------------


def dynamic_map(signed: bool, total_bits: int = 8, exponent_bits: int = 7) -> Tensor:
    """The dynamic-tree map (Dettmers 2015; bitsandbytes / torchao layout, no zero padding).

    Values are ``sign * 10**-k * f`` with ``k`` in ``0..exponent_bits-1`` and ``f`` the centres of
    a linear split of ``[0.1, 1]`` into ``2**(exponent_bits - 1 - k + extra)`` cells (more cells
    for larger values; ``extra = 1`` for unsigned maps, which reuse the sign bit), plus 0 and 1.
    Computed in fp32 exactly as torchao's ``create_dynamic_map`` does.

    Returns: fp32 tensor ``[2**total_bits]`` sorted ascending.
    """
    values: list[float] = []
    mantissa_bits = total_bits - 1 - exponent_bits  # 0 for both 8-bit (7) and 4-bit (3) maps
    for i in range(exponent_bits):
        n = 2 ** (i + mantissa_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, n + 1)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (i - exponent_bits + 1)) * centres
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    out = torch.tensor(sorted(values), dtype=torch.float32)
    if out.numel() != 2**total_bits:
        raise ValueError(f"dynamic_map: {out.numel()} values for total_bits={total_bits}")
    return out


def linear_map_zero_free(bits: int = 4) -> Tensor:
    """``{1, 2, ..., 2**bits} / 2**bits`` as fp32 ``[2**bits]``: the 4-bit second-moment map."""
    n = 2**bits
    return torch.arange(1, n + 1, dtype=torch.float32) / n


@cache
def _codebook_cpu(name: str) -> Tensor:
    if name == "dynamic8_signed":
        return dynamic_map(True, 8, 7)
    if name == "dynamic8_unsigned":
        return dynamic_map(False, 8, 7)
    if name == "dynamic4_signed":
        return dynamic_map(True, 4, 3)
    if name == "linear4_unsigned":
        return linear_map_zero_free(4)
    raise ValueError(f"unknown codebook {name!r}")


CODEBOOKS = ("dynamic8_signed", "dynamic8_unsigned", "dynamic4_signed", "linear4_unsigned")


def codebook(name: str, device: torch.device | str | None = None) -> Tensor:
    """A named codebook (one of ``CODEBOOKS``) as a sorted fp32 tensor on ``device``."""
    return _codebook_cpu(name).to(device if device is not None else "cpu")


def codebook_bits(name: str) -> int:
    """8 or 4: bits per code of a named codebook."""
    return 8 if name.startswith("dynamic8") else 4


# ---------------------------------------------------------------------------------------------
# exact nearest-code encode
# ---------------------------------------------------------------------------------------------


def _next_up(x: float) -> float:
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(math.inf)))


@cache
def _thresholds_cpu(name: str) -> Tensor:
    q = _codebook_cpu(name).double()
    out = []
    for lo, hi in zip(q[:-1].tolist(), q[1:].tolist()):
        mid = (lo + hi) / 2  # exact in float64: both are fp32 with close exponents
        t = float(torch.tensor(mid, dtype=torch.float32))  # nearest fp32 to the midpoint
        if t < mid:  # want the smallest fp32 >= mid (a tie goes up)
            t = _next_up(t)
        out.append(t)
    return torch.tensor(out, dtype=torch.float32)


def thresholds(name: str, device: torch.device | str | None = None) -> Tensor:
    """``T[c]`` = the smallest fp32 whose nearest map value is ``map[c+1]`` (ties go up).

    The nearest code of any fp32 ``x`` is then ``#{c : x >= T[c]}``. fp32 ``[n - 1]``.
    """
    return _thresholds_cpu(name).to(device if device is not None else "cpu")


def nearest_code(x: Tensor, name: str) -> Tensor:
    """Index of the nearest value of codebook ``name`` for each element of fp32 ``x`` (uint8).

    Exact nearest (ties to the larger value). Values beyond the map's ends clamp to them.
    """
    t = thresholds(name, x.device)
    return torch.searchsorted(t, x.float().contiguous(), right=True).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# blockwise codes + scales
# ---------------------------------------------------------------------------------------------


def num_blocks(numel: int, block_size: int) -> int:
    """``ceil(numel / block_size)``."""
    return -(-numel // block_size)


def block_absmax(x: Tensor, block_size: int) -> Tensor:
    """Per-block max of ``|x|`` over finite elements of flat fp32 ``x`` -> fp32 ``[nblocks]``."""
    x = x.reshape(-1).float()
    n = x.numel()
    pad = num_blocks(n, block_size) * block_size - n
    a = torch.where(torch.isfinite(x), x.abs(), 0.0)
    a = torch.nn.functional.pad(a, (0, pad))
    return a.view(-1, block_size).amax(dim=1)


def block_scale(absmax: Tensor, fp8: bool = False) -> Tensor:
    """A block's scale from its absmax: ``max(absmax, 1e-30)`` (divided by 448 for fp8)."""
    s = absmax.clamp_min(SCALE_FLOOR)
    return s / FP8_MAX if fp8 else s


def scale_to_unit(x: Tensor, scale: Tensor, block_size: int) -> Tensor:
    """``x * (1 / scale[block])`` in fp32 with non-finite elements replaced by 0 (flat)."""
    x = x.reshape(-1).float()
    inv = torch.repeat_interleave(1.0 / scale, block_size)[: x.numel()]
    return torch.where(torch.isfinite(x), x * inv, 0.0)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes < 16, ``[n]`` -> ``[ceil(n/2)]`` bytes: element ``2i`` low nibble, ``2i+1`` high."""
    c = codes.reshape(-1)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.view(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``[ceil(n/2)]`` bytes -> ``[n]`` uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:numel]


def quantize_blockwise(x: Tensor, name: str, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise codebook quantization of any-shape ``x`` (flattened).

    Returns ``(codes, scale)``: uint8 ``[n]`` (8-bit maps) or ``[ceil(n/2)]`` packed (4-bit maps),
    and fp32 ``[ceil(n / block_size)]``.
    """
    scale = block_scale(block_absmax(x, block_size))
    codes = nearest_code(scale_to_unit(x, scale, block_size), name)
    if codebook_bits(name) == 4:
        codes = pack_nibbles(codes)
    return codes, scale


def dequantize_blockwise(codes: Tensor, scale: Tensor, name: str, block_size: int, numel: int) -> Tensor:
    """``map[code] * scale[block]`` in fp32, flat ``[numel]``."""
    if codebook_bits(name) == 4:
        codes = unpack_nibbles(codes, numel)
    q = codebook(name, codes.device)[codes.long()]
    return q * torch.repeat_interleave(scale, block_size)[:numel]


def quantize_fp8_blockwise(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise e4m3 quantization: ``scale = max(absmax, 1e-30) / 448`` per block, codes are
    ``clamp(x / scale, -448, 448)`` cast to ``float8_e4m3fn`` (round to nearest even).

    Returns ``(codes float8_e4m3fn [n], scale fp32 [nblocks])``.
    """
    scale = block_scale(block_absmax(x, block_size), fp8=True)
    y = scale_to_unit(x, scale, block_size).clamp(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn), scale


def dequantize_fp8_blockwise(codes: Tensor, scale: Tensor, block_size: int, numel: int) -> Tensor:
    """``float(code) * scale[block]`` in fp32, flat ``[numel]``."""
    return codes.reshape(-1).float() * torch.repeat_interleave(scale, block_size)[:numel]


# ---------------------------------------------------------------------------------------------
# the cell table used by the fused CPU kernel
# ---------------------------------------------------------------------------------------------


def encode_cell_table(name: str) -> tuple[Tensor, dict[str, int]]:
    """Table for a gather-once exact encode of fp32 values in ``[-1, 1]``.

    ``|x|`` is clamped to ``[2**-lo_exp, 1]``; its fp32 bits minus those of ``2**-lo_exp`` split
    into a cell index (``>> shift``) and an offset inside the cell (``& (2**shift - 1)``). Each cell
    holds at most one code change, so an int32 entry ``(c1 << 23) | t`` gives the code as
    ``c1 - (off < t)``. Negative values use cells ``ncells..2*ncells-1`` with the offset mirrored
    (``off ^ mask``) so the code still steps up by one inside the cell.

    Returns ``(table int32 [2 * ncells], {"a_lo", "a_hi", "shift", "ncells"})``.
    """
    return _encode_cell_table_cpu(name)


@cache
def _encode_cell_table_cpu(name: str) -> tuple[Tensor, dict[str, int]]:
    import numpy as np

    t = _thresholds_cpu(name).numpy()
    tmin = float(np.abs(t).min())
    lo_exp = 1
    while 2.0 ** (-lo_exp) >= tmin:  # every |x| < 2**-lo_exp has the code of 0
        lo_exp += 1
    a_lo = int(np.float32(2.0**-lo_exp).view(np.int32))
    a_hi = int(np.float32(1.0).view(np.int32))

    def code(bits: np.ndarray, sign: float) -> np.ndarray:
        x = sign * bits.astype(np.int32).view(np.float32)
        return np.searchsorted(t, x, side="right").astype(np.int64)  # exact nearest (ties up)

    best = None
    for shift in range(22, 0, -1):  # coarsest cells that hold at most one code change
        w = 1 << shift
        starts = a_lo + w * np.arange(-(-(a_hi - a_lo + 1) // w), dtype=np.int64)
        ends = np.minimum(starts + w - 1, a_hi)
        tables = []
        for sign in (1.0, -1.0):
            c_small, c_big = code(starts, sign), code(ends, sign)  # codes at the cell's two ends
            c0 = np.minimum(c_small, c_big)
            if (np.abs(c_big - c_small) > 1).any():
                break
            change = c_small != c_big
            tb = np.abs(t[np.minimum(c0, t.size - 1)]).astype(np.float32).view(np.int32).astype(np.int64)
            # position (offset, mirrored for negatives) of the first element with code c0 + 1
            pos = tb - starts if sign > 0 else w - 1 - (tb - starts)
            tables.append(((c0 + 1) << 23) | np.where(change, pos, w))
        if len(tables) == 2:
            best = (shift, tables)
            break
    shift, tables = best
    table = np.concatenate(tables).astype(np.uint32).view(np.int32)
    meta = {"a_lo": a_lo, "a_hi": a_hi, "shift": shift, "ncells": tables[0].size}
    return torch.from_numpy(table.copy()), meta


def encode_with_cell_table(x: Tensor, table: Tensor, meta: dict[str, int]) -> Tensor:
    """Torch emulation of the kernel's table encode of fp32 ``x`` in ``[-1, 1]`` -> int64 codes."""
    bits = x.float().contiguous().view(torch.int32).long()
    neg = bits < 0
    a = bits & 0x7FFFFFFF
    a = torch.where(a >= 0x7F800000, 0, a)  # non-finite -> 0
    a = a.clamp(meta["a_lo"], meta["a_hi"]) - meta["a_lo"]
    mask = (1 << meta["shift"]) - 1
    cell = (a >> meta["shift"]) + torch.where(neg, meta["ncells"], 0)
    off = (a & mask) ^ torch.where(neg, mask, 0)
    e = table.long()[cell] & 0xFFFFFFFF
    return (e >> 23) - (off < (e & 0x7FFFFF)).long()


# ---------------------------------------------------------------------------------------------
# rank-1 normalization (Li et al. 2023): a 2-D tensor's element (i, j) is scaled by
# min(row max_i, column max_j) instead of its block's absmax
# ---------------------------------------------------------------------------------------------


def rank1_scales(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column maxima of ``|x|`` over finite elements of 2-D ``x``, floored at 1e-30: fp32
    ``[rows]``, ``[cols]``."""
    a = torch.where(torch.isfinite(x), x.float().abs(), 0.0)
    return a.amax(dim=1).clamp_min(SCALE_FLOOR), a.amax(dim=0).clamp_min(SCALE_FLOOR)


def rank1_scale(row: Tensor, col: Tensor) -> Tensor:
    """Each element's scale ``min(row[i], col[j])``, flat fp32 ``[rows * cols]``."""
    return torch.minimum(row[:, None], col[None, :]).reshape(-1)


def quantize_rank1(x: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-1-normalized codebook quantization of 2-D ``x``: ``code = nearest(x * (1 / min(row, col)))``,
    non-finite elements as the code of 0.

    Returns ``(codes, row, col)``: uint8 ``[n]`` or packed ``[ceil(n/2)]`` (4-bit maps), fp32 ``[rows]``,
    ``[cols]``."""
    row, col = rank1_scales(x)
    flat = x.reshape(-1).float()
    y = torch.where(torch.isfinite(flat), flat * (1.0 / rank1_scale(row, col)), 0.0)
    codes = nearest_code(y, name)
    if codebook_bits(name) == 4:
        codes = pack_nibbles(codes)
    return codes, row, col


def dequantize_rank1(codes: Tensor, row: Tensor, col: Tensor, name: str) -> Tensor:
    """``map[code] * min(row[i], col[j])`` in fp32, flat ``[rows * cols]``."""
    n = row.numel() * col.numel()
    if codebook_bits(name) == 4:
        codes = unpack_nibbles(codes, n)
    return codebook(name, codes.device)[codes.long()] * rank1_scale(row, col)
