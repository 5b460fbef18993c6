"""GPTQ (Frantar et al., 2022): round a weight column by column, spreading each column's rounding error
onto the columns not yet rounded through the inverse Hessian of the layer's inputs.

Pure functions. The quantization grid is the caller's (per-group qparams + fake quant), so the same
solver serves the symmetric int-N schemes and the tinygemm uint4 one, and what it returns is exactly
what that fake quant computes from the returned qparams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# qparams_fn(w_group [N, g]) -> qparams tuple of [N] tensors; fake_quant_fn(w_col [N], *qparams) -> [N]
QParamsFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
FakeQuantFn = Callable[..., torch.Tensor]


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in fp64, ``[K, K]``.

    Inputs that never fire (zero diagonal) get a unit diagonal, so their columns are rounded alone.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * torch.diagonal(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    qparams_fn: QParamsFn,
    fake_quant_fn: FakeQuantFn,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GPTQ of ``weight`` ``[N, K]`` with groups of ``group_size`` input columns.

    Each group's qparams are chosen (``qparams_fn``) from the group's columns as they stand when the
    solver reaches the group, i.e. after the error of the groups before it was spread onto them.

    Args:
        weight: ``[N, K]`` float weight (not modified).
        hessian: ``[K, K]`` ``sum_t x_t x_t^T`` of the layer's inputs (any float dtype).
        group_size: divides ``K``.
        qparams_fn: ``[N, g]`` group -> tuple of ``[N]`` qparams (e.g. ``(scale,)`` or ``(scale, zero)``).
        fake_quant_fn: ``(column [N], *qparams) -> [N]`` dequantized column on the grid.
        damp: relative diagonal damping of the Hessian.
        block_size: columns updated lazily together (a multiple of ``group_size``).

    Returns:
        ``(latent, qparams)``: ``latent`` ``[N, K]`` in ``weight.dtype``, each column the value the solver
        rounded (so ``fake_quant_fn`` of it with its group's qparams is the GPTQ-quantized column), and
        the per-group qparams stacked to ``[N, K // group_size]`` each.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"gptq: in_features {k} is not divisible by group_size {group_size}")
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: hessian shape {tuple(hessian.shape)} does not match in_features {k}")
    block_size = max(group_size, block_size // group_size * group_size)
    w = weight.double().clone()
    w[:, torch.diagonal(hessian) == 0] = 0.0
    hinv = inverse_hessian_factor(hessian, damp)
    latent = torch.empty_like(w)
    groups: list[tuple[torch.Tensor, ...]] = []
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, err = w[:, b0:b1].clone(), torch.empty(n, b1 - b0, dtype=w.dtype)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if (b0 + i) % group_size == 0:
                qp = qparams_fn(wb[:, i:i + group_size].to(weight.dtype))
                groups.append(qp)
            col = wb[:, i]
            latent[:, b0 + i] = col
            q = fake_quant_fn(col.to(weight.dtype), *qp).double()
            e = (col - q) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    stacked = [torch.stack([g[j] for g in groups], dim=-1) for j in range(len(groups[0]))]
    return latent.to(weight.dtype), stacked
