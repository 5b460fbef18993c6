"""A slow, obviously-correct reference Adam step over blockwise-quantized states.

Written independently of lowbit.optim's implementation: numpy fp32 arithmetic (IEEE, correctly
rounded, no fused multiply-add), a Python loop over blocks, nearest codes by brute force over the
whole codebook (exact rational comparison for near-ties, ties to the larger value), fp8 by
torch's own e4m3 cast (fp8 stores the second moment as sqrt(v), under ``exp_avg_sqrt_*``), the
stochastic-rounding hash in Python integers.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

f32 = np.float32


def nearest_codes(x: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest ``book`` value for each fp32 ``x`` (ties -> larger value)."""
    q = book.astype(np.float64)
    d = np.abs(x.astype(np.float64)[:, None] - q[None, :])
    two = np.partition(d, 1, axis=1)[:, :2]
    out = np.argmin(d, axis=1)
    near_tie = two[:, 1] - two[:, 0] <= 1e-9 * np.maximum(two[:, 0], 1e-30)
    for k in np.flatnonzero(near_tie):  # decide exactly, in rationals
        exact = [abs(Fraction(float(x[k])) - Fraction(float(v))) for v in book]
        best = min(exact)
        out[k] = max(c for c in range(book.size) if exact[c] == best)
    return out


def _rand16(index: int, seed: int) -> int:
    m = 0xFFFFFFFF
    x = (index * 0x9E3779B1 + seed) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x >> 16


def to_bf16(x: np.ndarray, stochastic: bool, seed: int) -> torch.Tensor:
    if not stochastic:
        return torch.from_numpy(x.copy()).to(torch.bfloat16)
    bits = x.view(np.uint32).astype(np.int64)
    r = np.array([_rand16(i, seed) for i in range(x.size)], dtype=np.int64)
    out = ((bits + r) >> 16) & 0xFFFF
    out = np.where(np.isnan(x), 0x7FC0, out).astype(np.uint16)
    return torch.from_numpy(out.view(np.int16).copy()).view(torch.bfloat16)


def _decode(codes: torch.Tensor, scale: np.ndarray, book: np.ndarray | None, bits: int, n: int, bs: int):
    c = codes.cpu().view(torch.uint8).numpy().astype(np.int64)
    if bits == 4:
        c = np.stack([c & 15, c >> 4], axis=1).reshape(-1)[:n]
    vals = (
        torch.from_numpy(c.astype(np.uint8)).view(torch.float8_e4m3fn).float().numpy()
        if book is None
        else book[c]
    )
    out = np.empty(n, dtype=f32)
    for b in range(scale.size):
        out[b * bs : (b + 1) * bs] = vals[b * bs : (b + 1) * bs] * scale[b]
    return out


def _encode(x: np.ndarray, book: np.ndarray | None, bits: int, bs: int):
    n = x.size
    nb = math.ceil(n / bs)
    scales = np.empty(nb, dtype=f32)
    codes = np.empty(n, dtype=np.int64)
    for b in range(nb):
        blk = x[b * bs : (b + 1) * bs]
        fin = np.isfinite(blk)
        amax = f32(np.abs(blk[fin]).max()) if fin.any() else f32(0)
        scale = max(amax, f32(1e-30))
        if book is None:
            scale = f32(scale / f32(448.0))
        inv = f32(f32(1.0) / scale)
        y = np.where(fin, blk * inv, f32(0)).astype(f32)
        if book is None:
            y = np.clip(y, f32(-448.0), f32(448.0))
            codes[b * bs : (b + 1) * bs] = (
                torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            )
        else:
            codes[b * bs : (b + 1) * bs] = nearest_codes(y, book)
        scales[b] = scale
    if bits == 4:
        if n % 2:
            codes = np.append(codes, 0)
        codes = codes[0::2] | (codes[1::2] << 4)
    out = torch.from_numpy(codes.astype(np.uint8))
    return (out.view(torch.float8_e4m3fn) if book is None else out), torch.from_numpy(scales)


def _decode_rank1(codes: torch.Tensor, row: np.ndarray, col: np.ndarray, book: np.ndarray) -> np.ndarray:
    """4-bit codes scaled by min(row max, column max), one element at a time."""
    c = codes.cpu().view(torch.uint8).numpy().astype(np.int64)
    c = np.stack([c & 15, c >> 4], axis=1).reshape(-1)
    out = np.empty(row.size * col.size, dtype=f32)
    for i in range(row.size):
        for j in range(col.size):
            k = i * col.size + j
            out[k] = book[c[k]] * min(row[i], col[j])
    return out


def _encode_rank1(x: np.ndarray, book: np.ndarray):
    """Row and column maxima over finite |x| (floored at 1e-30), code = nearest(x * (1 / min(row, col)))."""
    fin = np.isfinite(x)
    a = np.where(fin, np.abs(x), f32(0)).astype(f32)
    row = np.maximum(a.max(axis=1), f32(1e-30)).astype(f32)
    col = np.maximum(a.max(axis=0), f32(1e-30)).astype(f32)
    y = np.empty(x.size, dtype=f32)
    for i in range(row.size):
        for j in range(col.size):
            inv = f32(f32(1.0) / min(row[i], col[j]))
            y[i * col.size + j] = x[i, j] * inv if fin[i, j] else f32(0)
    codes = nearest_codes(y, book)
    if codes.size % 2:
        codes = np.append(codes, 0)
    packed = torch.from_numpy((codes[0::2] | (codes[1::2] << 4)).astype(np.uint8))
    return packed, torch.from_numpy(row), torch.from_numpy(col)


BOOKS = {
    "8bit": ("dynamic8_signed", "dynamic8_unsigned", 8),
    "4bit": ("dynamic4_signed", "linear4_unsigned", 4),
    "fp8": (None, None, 8),
}


def reference_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    fmt: str,
    block_size: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    stochastic: bool = False,
    seed: int = 0,
    books: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """Return ``(new_param, new_state)``; ``state`` as lowbit.optim stores it (codes+scales or fp32)."""
    step = float(state["step"]) + 1
    b1, b2 = betas
    # per-step scalars: float64, then fp32
    B1, OMB1, B2, OMB2, EPS = f32(b1), f32(1 - b1), f32(b2), f32(1 - b2), f32(eps)
    SS = f32(lr / (1 - b1**step))
    IBC = f32(1 / math.sqrt(1 - b2**step))
    DECAY = f32(1 - lr * weight_decay) if decoupled else f32(1)
    WD = f32(weight_decay)

    n = p.numel()
    P = p.detach().cpu().float().reshape(-1).numpy().copy()
    G = g.detach().cpu().float().reshape(-1).numpy().copy()
    quant = "exp_avg_codes" in state
    rank1 = "exp_avg_sq_row" in state
    vkey = "exp_avg_sqrt" if fmt == "fp8" else "exp_avg_sq"
    if quant:
        mb, vb, bits = BOOKS[fmt]
        qm = None if mb is None else books[mb]
        qv = None if vb is None else books[vb]
        M = _decode(state["exp_avg_codes"], state["exp_avg_scale"].cpu().numpy(), qm, bits, n, block_size)
        if rank1:
            V = _decode_rank1(
                state["exp_avg_sq_codes"],
                state["exp_avg_sq_row"].cpu().numpy(),
                state["exp_avg_sq_col"].cpu().numpy(),
                qv,
            )
        else:
            V = _decode(state[f"{vkey}_codes"], state[f"{vkey}_scale"].cpu().numpy(), qv, bits, n, block_size)
        if fmt == "fp8":  # stored: sqrt(v)
            V = V * V
    else:
        M = state["exp_avg"].cpu().reshape(-1).numpy().copy()
        V = state["exp_avg_sq"].cpu().reshape(-1).numpy().copy()

    with np.errstate(all="ignore"):
        if maximize:
            G = -G
        if not decoupled:
            G = G + WD * P
        M = B1 * M + OMB1 * G
        V = B2 * V + OMB2 * (G * G)
        P = P * DECAY
        U = np.where(V == 0, f32(0), M / (np.sqrt(V) * IBC + EPS)).astype(f32)  # no step where v == 0
        P = P - SS * U

    new_state = {"step": torch.tensor(step, dtype=torch.float32)}
    if quant:
        with np.errstate(all="ignore"):
            new_state["exp_avg_codes"], new_state["exp_avg_scale"] = _encode(M, qm, bits, block_size)
            stored = np.sqrt(V) if fmt == "fp8" else V
            if rank1:
                (new_state["exp_avg_sq_codes"], new_state["exp_avg_sq_row"], new_state["exp_avg_sq_col"]) = (
                    _encode_rank1(V.reshape(p.shape[0], p.shape[1]), qv)
                )
            else:
                new_state[f"{vkey}_codes"], new_state[f"{vkey}_scale"] = _encode(stored, qv, bits, block_size)
    else:
        new_state["exp_avg"] = torch.from_numpy(M).view(p.shape)
        new_state["exp_avg_sq"] = torch.from_numpy(V).view(p.shape)
    if p.dtype == torch.bfloat16:
        newp = to_bf16(P, stochastic, seed).view(p.shape)
    elif p.dtype == torch.float16:
        newp = torch.from_numpy(P).to(torch.float16).view(p.shape)  # nearest even
    else:
        newp = torch.from_numpy(P).view(p.shape)
    return newp, new_state


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, with every NaN equal to every NaN."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        if not torch.equal(na, nb):
            return False
        a, b = a[~na], b[~nb]
    w = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(w), b.contiguous().view(w))
