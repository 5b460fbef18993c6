"""Optimizer state formats: which codebooks, how state tensors are laid out, and validation.

Per parameter the state is a dict of plain tensors (loads with ``torch.load(weights_only=True)``):

- always ``step``: fp32 0-dim tensor on CPU (as in ``torch.optim.AdamW``);
- tensors with ``numel >= min_quant_size`` (quantized):
  ``exp_avg_codes`` / ``exp_avg_sq_codes`` (flat; uint8 ``[n]`` for 8-bit, uint8 ``[ceil(n/2)]``
  packed for 4-bit) and ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32 ``[ceil(n / block_size)]``);
  fp8 stores the second moment as its square root, under ``exp_avg_sqrt_codes`` /
  ``exp_avg_sqrt_scale`` (float8_e4m3fn ``[n]`` codes);
- smaller tensors: ``exp_avg`` / ``exp_avg_sq``, fp32 with the parameter's shape;
- 4-bit with ``v_norm="rank1"`` (2-D parameters): ``exp_avg_*`` as above, ``exp_avg_sq_codes`` packed
  ``[ceil(n/2)]`` and ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (fp32 ``[rows]`` / ``[cols]``): element
  ``(i, j)`` of ``v`` is ``map[code] * min(row[i], col[j])`` (rank-1 normalization, Li et al. 2023).

Why fp8 keeps ``sqrt(v)``: with absmax/448 per block, e4m3 flushes values below ``absmax * 2**-10 /
448`` to 0 and keeps only a few bits just above that. ``v`` spans the square of the gradients' range, so
stored directly, the small second moments of a block are lost (and their elements take steps of ``m /
eps``). ``sqrt(v)`` spans the gradients' own range, and it is what the update divides by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.quant import blockwise


@dataclass(frozen=True)
class StateFormat:
    """A quantized state format: kernel mode and the codebooks of the two moments."""

    name: str  # "8bit" | "4bit" | "fp8"
    mode: int  # kernel mode: 1 Q8, 2 Q4, 3 FP8 (0 is fp32 state)
    m_codebook: str | None
    v_codebook: str | None
    default_block_size: int
    v_sqrt: bool = False  # the second moment is stored as sqrt(v)
    v_rank1: bool = False  # the second moment is rank-1 normalized (2-D parameters; 4-bit)

    @property
    def v_key(self) -> str:
        """State-key prefix of the stored second moment (``exp_avg_sqrt`` when it is ``sqrt(v)``)."""
        return "exp_avg_sqrt" if self.v_sqrt else "exp_avg_sq"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.name == "fp8" else torch.uint8

    def code_numel(self, numel: int) -> int:
        return -(-numel // 2) if self.name == "4bit" else numel


FORMATS = {
    "8bit": StateFormat("8bit", 1, "dynamic8_signed", "dynamic8_unsigned", 256),
    "4bit": StateFormat("4bit", 2, "dynamic4_signed", "linear4_unsigned", 128),
    "fp8": StateFormat("fp8", 3, None, None, 256, v_sqrt=True),
}
# AdamW4bit(v_norm="rank1") for 2-D parameters: m as "4bit"; v's codes scaled by min(row max, column max)
RANK1 = StateFormat("4bit", 4, "dynamic4_signed", "linear4_unsigned", 128, v_rank1=True)
FP32_MODE = 0
FP32_KEYS = ("exp_avg", "exp_avg_sq")


def is_quantized(p: Tensor, min_quant_size: int) -> bool:
    """Whether ``p`` gets quantized state (``numel >= min_quant_size``)."""
    return p.numel() >= min_quant_size


def _zero_code(name: str | None) -> int:
    if name is None:  # fp8: the e4m3 code of +0
        return 0
    return int(blockwise.nearest_code(torch.zeros(1), name))


def init_state(p: Tensor, fmt: StateFormat, block_size: int, min_quant_size: int) -> dict[str, Tensor]:
    """Fresh state (zero moments) for parameter ``p``."""
    state = {"step": torch.tensor(0.0, dtype=torch.float32)}
    if not is_quantized(p, min_quant_size):
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state
    for key, (dtype, shape) in expected_layout(p, fmt, block_size, min_quant_size).items():
        if key.endswith("_codes"):
            z = _zero_code(fmt.m_codebook if key == "exp_avg_codes" else fmt.v_codebook)
            if fmt.name == "4bit":
                z = z | (z << 4)
            state[key] = torch.full(shape, z, dtype=torch.uint8, device=p.device).view(dtype)
        else:
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
    return state


def expected_layout(p: Tensor, fmt: StateFormat, block_size: int, min_quant_size: int) -> dict[str, tuple]:
    """``{key: (dtype, shape)}`` of the state tensors ``p`` must have (``step`` excluded)."""
    if not is_quantized(p, min_quant_size):
        return {k: (torch.float32, tuple(p.shape)) for k in FP32_KEYS}
    n = p.numel()
    nb = blockwise.num_blocks(n, block_size)
    out = {}
    for key in ("exp_avg", fmt.v_key):
        out[f"{key}_codes"] = (fmt.code_dtype, (fmt.code_numel(n),))
        out[f"{key}_scale"] = (torch.float32, (nb,))
    if fmt.v_rank1:
        del out[f"{fmt.v_key}_scale"]
        out[f"{fmt.v_key}_row"] = (torch.float32, (p.shape[0],))
        out[f"{fmt.v_key}_col"] = (torch.float32, (p.shape[1],))
    return out


def check_state(
    state: dict, p: Tensor, fmt: StateFormat, block_size: int, min_quant_size: int, where: str
) -> None:
    """Raise ``ValueError`` naming ``where`` if ``state`` does not have the expected layout."""
    want = expected_layout(p, fmt, block_size, min_quant_size)
    kind = "fp32"
    if is_quantized(p, min_quant_size):
        kind = f"{fmt.name}{' rank-1 v_norm' if fmt.v_rank1 else ''} (block_size={block_size})"
    keys = set(state) - {"step"}
    if keys != set(want):
        raise ValueError(
            f"optimizer state for {where} (shape {list(p.shape)}) does not match this optimizer's "
            f"{kind} state: expected keys {sorted(want)} + ['step'], got {sorted(state)}"
        )
    if "step" not in state or not isinstance(state["step"], Tensor) or state["step"].numel() != 1:
        raise ValueError(f"optimizer state for {where}: 'step' must be a 1-element tensor")
    for key, (dtype, shape) in want.items():
        t = state[key]
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"optimizer state for {where} (shape {list(p.shape)}), key {key!r}: expected {kind} "
                f"state {dtype} {list(shape)}, got {got}"
            )
