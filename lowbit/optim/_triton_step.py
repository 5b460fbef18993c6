"""The fused Adam step as one Triton kernel launch per bucket of parameters (CUDA; CPU via the interpreter).

A bucket is the parameters of one param group with the same device, dtype and state kind (quantized or
fp32). One launch updates all of them: the kernel reads a table of addresses and sizes (built once per
set of tensors and cached on the device) and a per-step table (gradient addresses, stochastic-rounding
seeds, the nine fp32 hyper-parameters of each parameter) copied to the device without a host sync. Every
program updates ``ROWS`` whole quantization blocks of one parameter: decode, the fp32 Adam update, the
new per-block absmax, encode. Learning rate, step and shapes are data, not compile-time constants, so
they never recompile the kernel; the compile-time constants are the format, the dtype, the options
(maximize, coupled weight decay, stochastic rounding) and whether every tensor of the bucket is 16-byte
aligned with a multiple of 16 elements (then loads and stores are 16-byte vectors).

Numerics are those of the reference step (``lowbit.optim._torch_step``, tests/optim/reference.py), op by
op: fp32 multiplies and adds launched with ``enable_fp_fusion=False`` (no FMA contraction), correctly
rounded ``sqrt_rn`` / ``div_rn``, no denormal flushing, the exact nearest code from one load of the
codebook's cell table (``lowbit.quant.blockwise.encode_cell_table``, as the C++ kernel's table encode),
e4m3 encode and decode and bf16 rounding by integer bit manipulation. Every such operation has one correct
result, so the interpreter (numpy, which the CPU tests run) and the GPU compute the same bits.

The kernels are built twice from the same functions: compiled (``JITFunction``) for CUDA tensors and
interpreted (``InterpretedFunction``) for CPU tensors, whatever ``TRITON_INTERPRET`` says. So the device
code calls only Triton builtins and its own functions: ``tl.max`` and other ``@triton.jit`` library
functions were wrapped for one mode when triton was imported and cannot be called from the other.
"""

from __future__ import annotations

import types
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.quant import blockwise

from .formats import FP32_MODE, StateFormat

ELEMS = 2048  # elements per program (ROWS blocks of BLOCK lanes)
NUM_WARPS = 8
# table layouts (constants of the device code too)
STATIC_COLS = tl.constexpr(6)  # per parameter: param, m, v, m scale, v scale addresses, numel
STEP_COLS = tl.constexpr(11)  # per parameter: gradient address, seed, then 9 fp32 hyper-parameters ...
HYPER_SLOT = tl.constexpr(4)  # ... at fp32 slots 4..12, then (rank-1 v) the old and new row / column scales
RANK1_COL = tl.constexpr(7)  # ... addresses at int64 columns 7..10
_PKIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ------------------------------------------------------------------------------------------ device code
# Plain functions: ``kernel()`` wraps them as Triton functions (compiled or interpreted).


def _ptr(addr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The address ``addr`` (int64) as a pointer; ``ALIGNED``: it is a multiple of 16 bytes (host-checked),
    so contiguous loads and stores can be 16-byte vectors."""
    ptr = addr.to(tl.pointer_type(dtype), bitcast=True)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


def _load_float(addr, e, mask, PKIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``e`` of the fp32 / bf16 / fp16 tensor at ``addr`` as fp32 (exact)."""
    if PKIND == 1:
        u = tl.load(_ptr(addr, tl.uint16, ALIGNED) + e, mask=mask, other=0)
        return (u.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif PKIND == 2:
        return tl.load(_ptr(addr, tl.float16, ALIGNED) + e, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(_ptr(addr, tl.float32, ALIGNED) + e, mask=mask, other=0.0)


def _rand16(index, seed):
    """16 random bits from a counter hash of (element index, seed), as ``_torch_step.rand16``."""
    z = index.to(tl.uint32) * 0x9E3779B1 + seed
    z = z ^ (z >> 16)
    z = z * 0x7FEB352D
    z = z ^ (z >> 15)
    z = z * 0x846CA68B
    z = z ^ (z >> 16)
    return z >> 16


def _store_param(addr, e, mask, x, seed, PKIND: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr):
    """Store fp32 ``x``: as is, rounded to fp16 (nearest even), or to bf16 (nearest even / stochastic)."""
    if PKIND == 1:
        b = x.to(tl.uint32, bitcast=True)
        if SR:
            r = _rand16(e, seed)
        else:
            r = 0x7FFF + ((b >> 16) & 1)
        out = tl.where(x != x, 0x7FC0, (b + r) >> 16)
        tl.store(_ptr(addr, tl.uint16, ALIGNED) + e, out.to(tl.uint16), mask=mask)
    elif PKIND == 2:
        tl.store(_ptr(addr, tl.float16, ALIGNED) + e, x.to(tl.float16), mask=mask)
    else:
        tl.store(_ptr(addr, tl.float32, ALIGNED) + e, x, mask=mask)


def _decode_fp8(c):
    """e4m3fn bits (uint8) -> fp32, exactly (normals by moving the bits, subnormals m * 2**-9)."""
    b = c.to(tl.uint32)
    mag = b & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    x = tl.where(mag < 8, mag.to(tl.float32) * 0.001953125, normal)
    x = tl.where(mag == 0x7F, float("nan"), x)
    return tl.where((b & 0x80) != 0, -x, x)


def _encode_fp8(y):
    """Finite fp32 -> e4m3fn bits: saturate to +-448, round to nearest even (as torch's cast)."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    b = y.to(tl.uint32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = b & 0x7FFFFFFF
    af = a.to(tl.float32, bitcast=True)
    # subnormal: |y| + 2**14 rounds |y| to a multiple of 2**-9 (the ulp at 2**14), ties to even
    sub = (af + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    return (tl.where(af < 0.015625, sub, normal) | sign).to(tl.uint8)


def _max(a, b):
    return tl.maximum(a, b)


def _nearest_code(y, t_ptr):
    """The exact nearest code (ties up) of finite ``y`` in [-1, 1] from one load of the codebook's cell table
    (``lowbit.quant.blockwise.encode_cell_table``; ``t_ptr``: a_lo, a_hi, shift, ncells, then the table)."""
    a_lo = tl.load(t_ptr)
    a_hi = tl.load(t_ptr + 1)
    shift = tl.load(t_ptr + 2)
    ncells = tl.load(t_ptr + 3)
    b = y.to(tl.int32, bitcast=True)
    neg = b >> 31  # arithmetic shift: -1 for negative y, else 0
    a = tl.minimum(tl.maximum(b & 0x7FFFFFFF, a_lo), a_hi) - a_lo
    mask = (1 << shift) - 1
    entry = tl.load(t_ptr + 4 + (a >> shift) + (neg & ncells)).to(tl.uint32)
    off = ((a & mask) ^ (neg & mask)).to(tl.uint32)
    return (entry >> 23).to(tl.int32) - (off < (entry & 0x7FFFFF)).to(tl.int32)


def _decode(addr, scale, e, mask, qmap_ptr, MODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Moment values ``code value * block scale`` of elements ``e``."""
    if MODE == 3:
        c = tl.load(_ptr(addr, tl.uint8, ALIGNED) + e, mask=mask, other=0)
        q = _decode_fp8(c)
    elif MODE == 2:
        byte = tl.load(_ptr(addr, tl.uint8, ALIGNED) + (e >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.load(qmap_ptr + ((byte >> ((e & 1) * 4).to(tl.int32)) & 15))
    else:
        q = tl.load(qmap_ptr + tl.load(_ptr(addr, tl.uint8, ALIGNED) + e, mask=mask, other=0).to(tl.int32))
    return q * scale


def _store_codes4(
    code, blk, bs, n, codes_addr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr
):
    """Store 4-bit codes ([ROWS, BLOCK], 0 where invalid) two per byte, element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(code, (ROWS, BLOCK // 2, 2)))
    k = tl.arange(0, BLOCK // 2)[None, :]
    first = blk[:, None] * bs + 2 * k  # the even element of each byte
    tl.store(
        _ptr(codes_addr, tl.uint8, ALIGNED) + (first >> 1),
        (lo | (hi << 4)).to(tl.uint8),
        mask=(2 * k < bs) & (first < n),
    )


def _rank1_scale(row_addr, col_addr, i, jj, valid):
    """min(row[i], col[jj]) of a rank-1 normalized second moment (1 where not ``valid``)."""
    r = tl.load(_ptr(row_addr, tl.float32, False) + i, mask=valid, other=1.0)
    c = tl.load(_ptr(col_addr, tl.float32, False) + jj, mask=valid, other=1.0)
    return tl.minimum(r, c)


def _quantize_store(
    x,
    e,
    valid,
    blk,
    bs,
    n,
    codes_addr,
    scale_addr,
    t_ptr,
    MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Blockwise-quantize ``x`` ([ROWS, BLOCK], one block per row) and store codes and scales.

    Non-finite elements are stored as the code of 0 and stay out of the block's absmax."""
    x = tl.where((tl.abs(x) <= 3.4028234663852886e38) & valid, x, 0.0)
    scale = tl.maximum(tl.reduce(tl.abs(x), 1, _max), 1e-30)
    if MODE == 3:
        scale = tl.div_rn(scale, tl.full(scale.shape, 448.0, tl.float32))
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    y = x * inv[:, None]
    tl.store(_ptr(scale_addr, tl.float32, ALIGNED) + blk, scale, mask=blk * bs < n)
    if MODE == 3:
        tl.store(_ptr(codes_addr, tl.uint8, ALIGNED) + e, _encode_fp8(y), mask=valid)
    elif MODE == 2:
        code = tl.where(valid, _nearest_code(y, t_ptr), 0)
        _store_codes4(code, blk, bs, n, codes_addr, ROWS, BLOCK, ALIGNED)
    else:
        tl.store(_ptr(codes_addr, tl.uint8, ALIGNED) + e, _nearest_code(y, t_ptr).to(tl.uint8), mask=valid)


def _adam_kernel(
    static_ptr,
    step_ptr,
    hyper_ptr,
    prog_ptr,
    qm_ptr,
    qv_ptr,
    tm_ptr,
    tv_ptr,
    bs,
    MODE: tl.constexpr,
    PKIND: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr,
    SR: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # which parameter, which blocks
    pid = tl.program_id(0)
    j = tl.load(prog_ptr + 2 * pid)
    blk = tl.load(prog_ptr + 2 * pid + 1) + tl.arange(0, ROWS)  # int64 [ROWS]
    row = static_ptr + STATIC_COLS * j
    p_addr = tl.load(row)
    m_addr = tl.load(row + 1)
    v_addr = tl.load(row + 2)
    n = tl.load(row + 5)
    if ALIGNED:  # (and every size a multiple of 16: masks are constant over 16-element vectors)
        n = tl.multiple_of(n, 16)
    g_addr = tl.load(step_ptr + STEP_COLS * j)
    seed = tl.load(step_ptr + STEP_COLS * j + 1).to(tl.uint32)
    h = hyper_ptr + 2 * STEP_COLS * j + HYPER_SLOT
    b1 = tl.load(h)
    omb1 = tl.load(h + 1)
    b2 = tl.load(h + 2)
    omb2 = tl.load(h + 3)
    eps = tl.load(h + 4)
    step_size = tl.load(h + 5)
    inv_bc2_sqrt = tl.load(h + 6)
    decay = tl.load(h + 7)
    wd = tl.load(h + 8)

    col = tl.arange(0, BLOCK)[None, :]
    e = blk[:, None] * bs + col
    valid = (col < bs) & (e < n)
    p = _load_float(p_addr, e, valid, PKIND, ALIGNED)
    g = _load_float(g_addr, e, valid, PKIND, ALIGNED)
    if MODE == 0:
        m = tl.load(_ptr(m_addr, tl.float32, ALIGNED) + e, mask=valid, other=0.0)
        v = tl.load(_ptr(v_addr, tl.float32, ALIGNED) + e, mask=valid, other=0.0)
    else:
        rows_valid = blk * bs < n
        sm = tl.load(_ptr(tl.load(row + 3), tl.float32, ALIGNED) + blk, mask=rows_valid, other=0.0)[:, None]
        if MODE == 4:  # rank-1 v: element (i, jj) scaled by min(row[i], col[jj]); static column 4 holds cols
            m = _decode(m_addr, sm, e, valid, qm_ptr, 2, ALIGNED)
            cols = tl.load(row + 4)
            i = e // cols
            jj = e % cols
            r1 = step_ptr + STEP_COLS * j + RANK1_COL
            sv = _rank1_scale(tl.load(r1), tl.load(r1 + 1), i, jj, valid)
            v = _decode(v_addr, sv, e, valid, qv_ptr, 2, ALIGNED)
        else:
            sv = tl.load(_ptr(tl.load(row + 4), tl.float32, ALIGNED) + blk, mask=rows_valid, other=0.0)[
                :, None
            ]
            m = _decode(m_addr, sm, e, valid, qm_ptr, MODE, ALIGNED)
            v = _decode(v_addr, sv, e, valid, qv_ptr, MODE, ALIGNED)
        if MODE == 3:  # stored: sqrt(v)
            v = v * v

    # the update, in the reference's order (lowbit.optim._torch_step.adam_math)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + wd * p
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * (g * g)
    p = p * decay
    r = tl.sqrt_rn(v)
    u = tl.where(v == 0.0, 0.0, tl.div_rn(m, r * inv_bc2_sqrt + eps))  # no step where v == 0
    p = p - step_size * u
    _store_param(p_addr, e, valid, p, seed, PKIND, SR, ALIGNED)

    if MODE == 0:
        tl.store(_ptr(m_addr, tl.float32, ALIGNED) + e, m, mask=valid)
        tl.store(_ptr(v_addr, tl.float32, ALIGNED) + e, v, mask=valid)
    elif MODE == 4:
        _quantize_store(m, e, valid, blk, bs, n, m_addr, tl.load(row + 3), tm_ptr, 2, ROWS, BLOCK, ALIGNED)
        # v with the new row / column scales (the maxima of the new v, from _rank1_max_kernel)
        r1 = step_ptr + STEP_COLS * j + RANK1_COL
        s_new = _rank1_scale(tl.load(r1 + 2), tl.load(r1 + 3), i, jj, valid)
        y = tl.where((tl.abs(v) <= 3.4028234663852886e38) & valid, v, 0.0) * tl.div_rn(
            tl.full(s_new.shape, 1.0, tl.float32), s_new
        )
        code = tl.where(valid, _nearest_code(y, tv_ptr), 0)
        _store_codes4(code, blk, bs, n, v_addr, ROWS, BLOCK, ALIGNED)
    else:
        if MODE == 3:
            v = r
        _quantize_store(m, e, valid, blk, bs, n, m_addr, tl.load(row + 3), tm_ptr, MODE, ROWS, BLOCK, ALIGNED)
        _quantize_store(v, e, valid, blk, bs, n, v_addr, tl.load(row + 4), tv_ptr, MODE, ROWS, BLOCK, ALIGNED)


def _rank1_max_kernel(
    static_ptr,
    step_ptr,
    hyper_ptr,
    prog_ptr,
    qv_ptr,
    bs,
    PKIND: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Pass 1 of a rank-1 bucket: the new second moment of every element (as _adam_kernel computes it),
    its finite |v| max-ed into the new row and column scales (which start at 1e-30)."""
    pid = tl.program_id(0)
    j = tl.load(prog_ptr + 2 * pid)
    blk = tl.load(prog_ptr + 2 * pid + 1) + tl.arange(0, ROWS)
    row = static_ptr + STATIC_COLS * j
    n = tl.load(row + 5)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    cols = tl.load(row + 4)
    h = hyper_ptr + 2 * STEP_COLS * j + HYPER_SLOT
    col = tl.arange(0, BLOCK)[None, :]
    e = blk[:, None] * bs + col
    valid = (col < bs) & (e < n)
    i = e // cols
    jj = e % cols
    r1 = step_ptr + STEP_COLS * j + RANK1_COL
    sv = _rank1_scale(tl.load(r1), tl.load(r1 + 1), i, jj, valid)
    v = _decode(tl.load(row + 2), sv, e, valid, qv_ptr, 2, ALIGNED)
    g = _load_float(tl.load(step_ptr + STEP_COLS * j), e, valid, PKIND, ALIGNED)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + tl.load(h + 8) * _load_float(tl.load(row), e, valid, PKIND, ALIGNED)
    v = tl.load(h + 2) * v + tl.load(h + 3) * (g * g)
    a = tl.where((tl.abs(v) <= 3.4028234663852886e38) & valid, tl.abs(v), 0.0)
    tl.atomic_max(_ptr(tl.load(r1 + 2), tl.float32, False) + i, a, mask=valid)
    tl.atomic_max(_ptr(tl.load(r1 + 3), tl.float32, False) + jj, a, mask=valid)


_DEVICE_FUNCS = (
    "_max",
    "_ptr",
    "_load_float",
    "_rand16",
    "_store_param",
    "_decode_fp8",
    "_encode_fp8",
    "_nearest_code",
    "_decode",
    "_store_codes4",
    "_rank1_scale",
    "_quantize_store",
)
KERNELS = ("_adam_kernel", "_rank1_max_kernel")
_kernels: dict[tuple[bool, str], object] = {}


def kernel(interpret: bool, name: str = "_adam_kernel"):
    """A kernel of ``KERNELS``, compiled (CUDA tensors) or interpreted (CPU tensors); built once each.

    Each variant gets its own copies of the device functions, wrapped the same way: a compiled kernel
    calls compiled functions, an interpreted one interpreted functions."""
    if (interpret, name) not in _kernels:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        wrap = InterpretedFunction if interpret else JITFunction
        scope = dict(globals())
        for f_name in (*_DEVICE_FUNCS, *KERNELS):
            f = globals()[f_name]
            scope[f_name] = wrap(types.FunctionType(f.__code__, scope, f_name, f.__defaults__))
        if interpret:  # the interpreter reduces with numpy only for the library's own max (same result)
            scope["_max"] = tl.standard._elementwise_max
        for k in KERNELS:
            _kernels[interpret, k] = scope[k]
    return _kernels[interpret, name]


# ------------------------------------------------------------------------------------------ host side
_tables: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()
_books: dict[tuple, Tensor] = {}
MAX_TABLES = 64


def _book(kind: str, name: str | None, device: torch.device) -> Tensor:
    """On ``device``: a codebook (``"q"``, fp32) or its encode cell table (``"t"``, int32: a_lo, a_hi, shift,
    ncells, then the table)."""
    key = (kind, name, device)
    if key not in _books:
        if name is None:  # fp8: no tables
            t = torch.zeros(1)
        elif kind == "q":
            t = blockwise.codebook(name)
        else:
            table, meta = blockwise.encode_cell_table(name)
            head = torch.tensor(
                [meta["a_lo"], meta["a_hi"], meta["shift"], meta["ncells"]], dtype=torch.int32
            )
            t = torch.cat([head, table])
        _books[key] = t.to(device)
    return _books[key]


def _table(
    device: torch.device, static: tuple[tuple[int, ...], ...], bs: int, rows: int
) -> tuple[Tensor, Tensor]:
    """Device tensors of the static table and the program map (parameter, first block), cached."""
    key = (device, bs, rows, static)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    progs = []
    for j, entry in enumerate(static):
        nb = -(-entry[5] // bs)
        progs += [(j, b) for b in range(0, nb, rows)]
    hit = (
        torch.tensor(static, dtype=torch.int64).to(device),
        torch.tensor(progs, dtype=torch.int64).reshape(-1, 2).to(device),
    )
    _tables[key] = hit
    if len(_tables) > MAX_TABLES:
        _tables.popitem(last=False)
    return hit


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # no host sync
    return t.to(device)


def step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    fmt: StateFormat | None,
    block_size: int,
    hyper: Tensor,
    seeds: list[int],
    maximize: bool,
    coupled: bool,
    stochastic: bool,
) -> None:
    """Update ``params`` (one device and dtype, contiguous) and their states with one kernel launch (rank-1
    normalized 4-bit state: a fill and two launches).

    ``hyper``: fp32 ``[len(params), 9]`` (``_torch_step.HYPER_FIELDS``); ``fmt=None``: fp32 states.
    """
    device = params[0].device
    rank1 = fmt is not None and fmt.v_rank1
    if fmt is None:
        bs = ELEMS
        keys = ("exp_avg", "exp_avg_sq", None, None)
        mode, books = FP32_MODE, (None, None)
    else:
        bs = block_size
        keys = (
            "exp_avg_codes",
            f"{fmt.v_key}_codes",
            "exp_avg_scale",
            None if rank1 else f"{fmt.v_key}_scale",
        )
        mode, books = fmt.mode, (fmt.m_codebook, fmt.v_codebook)
    block = triton.next_power_of_2(bs)
    rows = max(1, ELEMS // block)
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    static = tuple(  # (rank-1 v: column 4 holds the number of columns)
        (
            params[i].data_ptr(),
            *(states[i][k].data_ptr() if k else 0 for k in keys[:3]),
            params[i].shape[-1] if rank1 else states[i][keys[3]].data_ptr() if keys[3] else 0,
            params[i].numel(),
        )
        for i in live
    )
    table, progs = _table(device, static, bs, rows)

    per_step = torch.zeros((len(live), STEP_COLS.value), dtype=torch.int64)
    per_step[:, 0] = torch.tensor([grads[i].data_ptr() for i in live], dtype=torch.int64)
    per_step[:, 1] = torch.tensor([seeds[i] & 0xFFFFFFFF for i in live], dtype=torch.int64)
    per_step.view(torch.float32)[:, HYPER_SLOT.value : HYPER_SLOT.value + 9] = hyper[live]
    if rank1:  # new row / column scales: one buffer for the bucket, starting at the scale floor
        sizes = [(params[i].shape[0], params[i].shape[1]) for i in live]
        fresh = torch.full(
            (sum(r + c for r, c in sizes),), blockwise.SCALE_FLOOR, dtype=torch.float32, device=device
        )
        new_rc, at = [], 0
        for r, c in sizes:
            new_rc.append((fresh[at : at + r], fresh[at + r : at + r + c]))
            at += r + c
        per_step[:, RANK1_COL.value : RANK1_COL.value + 4] = torch.tensor(
            [
                (
                    states[i]["exp_avg_sq_row"].data_ptr(),
                    states[i]["exp_avg_sq_col"].data_ptr(),
                    nr.data_ptr(),
                    nc.data_ptr(),
                )
                for i, (nr, nc) in zip(live, new_rc)
            ],
            dtype=torch.int64,
        )
    step_t = _to_device(per_step, device)
    # every tensor the kernel streams starts on a 16-byte boundary (always, unless a parameter is a view at an
    # odd offset) and has a multiple of 16 elements: then its loads and stores can be 16-byte vectors
    streamed = [a for entry in static for a in entry[: 4 if rank1 else 5]] + per_step[:, 0].tolist()
    aligned = all(a % 16 == 0 for a in streamed) and all(entry[5] % 16 == 0 for entry in static)

    interpret = device.type != "cuda"
    grid = (progs.shape[0],)
    pkind = _PKIND[params[0].dtype]
    with _quiet_numpy() if interpret else torch.cuda.device(device):  # launch on the parameters' GPU
        if rank1:
            kernel(interpret, "_rank1_max_kernel")[grid](
                table,
                step_t,
                step_t.view(torch.float32),
                progs,
                _book("q", books[1], device),
                bs,
                PKIND=pkind,
                BLOCK=block,
                ROWS=rows,
                MAXIMIZE=bool(maximize),
                COUPLED=bool(coupled),
                ALIGNED=aligned,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
        _launch(
            kernel(interpret)[grid],
            table,
            step_t,
            progs,
            books,
            device,
            bs,
            mode,
            params[0].dtype,
            block,
            rows,
            maximize,
            coupled,
            stochastic,
            aligned,
        )
    if rank1:  # the new scales become the state (views of the bucket's buffer: no copy)
        for i, (nr, nc) in zip(live, new_rc):
            states[i]["exp_avg_sq_row"] = nr
            states[i]["exp_avg_sq_col"] = nc


def _quiet_numpy():
    import numpy as np  # the interpreter's arithmetic: NaN and inf are data here, not errors

    return np.errstate(all="ignore")


def _launch(
    launcher,
    table,
    step_t,
    progs,
    books,
    device,
    bs,
    mode,
    dtype,
    block,
    rows,
    maximize,
    coupled,
    stochastic,
    aligned,
):
    launcher(
        table,
        step_t,
        step_t.view(torch.float32),
        progs,
        _book("q", books[0], device),
        _book("q", books[1], device),
        _book("t", books[0], device),
        _book("t", books[1], device),
        bs,
        MODE=mode,
        PKIND=_PKIND[dtype],
        BLOCK=block,
        ROWS=rows,
        MAXIMIZE=bool(maximize),
        COUPLED=bool(coupled),
        SR=bool(stochastic and dtype == torch.bfloat16),
        ALIGNED=aligned,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
