"""GPTQ initialisation of learned ranges: start QAT where GPTQ would leave a post-training quantization.

:func:`gptq_init` runs the float model over calibration tokens, accumulates each prepared linear's input
Hessian ``X^T X``, and solves GPTQ (:func:`lowbit.quant.gptq.gptq`) on the scheme's own grid. Each layer
keeps its trainable float weight and learned qparams: the weight becomes the values GPTQ rounded and the
qparams GPTQ's per-group ones, so the prepared model's forward at step 0 is the GPTQ-quantized model's
(and ``convert`` deploys exactly that); training then moves both from there.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.qat.api import enable_fake_quant, fake_quant_modules
from lowbit.qat.modules import FakeQuantLinear
from lowbit.quant.affine import (
    dequantize_tinygemm,
    fake_quantize,
    mse_symmetric_scale,
    mse_tinygemm_qparams,
    quantize_tinygemm,
)
from lowbit.quant.gptq import gptq

log = logging.getLogger("lowbit")


def _grid(scheme):
    """``(qparams_fn, fake_quant_fn)`` of one group / column on ``scheme``'s weight grid (see ``gptq``)."""
    if scheme.name == "4w":
        def qparams(wg):
            s, z = mse_tinygemm_qparams(wg, wg.shape[-1])
            return s[:, 0], z[:, 0]

        def fake_quant(col, s, z):
            q = quantize_tinygemm(col[:, None], s[:, None], z[:, None], 1)
            return dequantize_tinygemm(q, s[:, None], z[:, None], 1, dtype=col.dtype)[:, 0]
        return qparams, fake_quant
    qmin, qmax = scheme.weight_range

    def qparams(wg):
        return (mse_symmetric_scale(wg, qmin, qmax, group_size=None)[:, 0],)

    def fake_quant(col, s):
        return fake_quantize(col[:, None], s[:, None], None, qmin, qmax, group_size=None)[:, 0]
    return qparams, fake_quant


@torch.no_grad()
def collect_hessians(model: nn.Module, layers: dict[str, nn.Module], rows: torch.Tensor,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``sum_t x_t x_t^T`` (fp32, ``[K, K]``) of the inputs of ``layers`` while ``model`` (fake quant off)
    runs over ``rows`` ``[B, T]`` (token ids) in batches of ``batch_size``."""
    hessians = {fqn: torch.zeros(m.in_features, m.in_features) for fqn, m in layers.items()}
    last: list = [None, None]  # q / k / v (and gate / up) share one input: one product for them

    def hook(fqn):
        def fn(_mod, args):
            x = args[0]
            if last[0] is not x:
                flat = x.detach().flatten(0, -2).float()
                last[0], last[1] = x, flat.t() @ flat
            hessians[fqn] += last[1]
        return fn

    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in layers.items()]
    was_training = model.training
    enable_fake_quant(model, False)
    model.eval()
    try:
        for batch in rows.split(batch_size):
            model(batch)
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
        enable_fake_quant(model, True)
        model.train(was_training)
    return hessians


@torch.no_grad()
def gptq_init(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 4, damp: float = 0.01) -> int:
    """Give every prepared linear with learned ranges GPTQ's weights and qparams; returns how many.

    Args:
        model: a model prepared with ``learn_ranges=True`` (fake quant is switched off while the
            calibration forward runs, then on).
        rows: ``[B, T]`` int64 calibration tokens (training text, never evaluation text).

    Raises:
        ValueError: no prepared linear learns its ranges, or ``rows`` is empty.
    """
    layers = {fqn: m for fqn, m in fake_quant_modules(model).items()
              if type(m) is FakeQuantLinear and m.learned_qparams() is not None}
    if not layers:
        raise ValueError("gptq_init: no linear prepared with learned ranges "
                         "(prepare(..., learn_ranges=True))")
    if rows.numel() == 0:
        raise ValueError("gptq_init: no calibration rows")
    hessians = collect_hessians(model, layers, rows, batch_size)
    for fqn, m in layers.items():
        qparams_fn, fake_quant_fn = _grid(m.scheme)
        latent, qp = gptq(m.weight.detach().float(), hessians.pop(fqn), m.scheme.group_size, qparams_fn,
                          fake_quant_fn, damp=damp)
        m.weight.copy_(latent)
        m.weight_scale.copy_(qp[0])
        if len(qp) > 1:
            m.weight_zero.copy_(qp[1])
    log.info("qat: GPTQ initialised %d layers from %d calibration tokens", len(layers), rows.numel())
    return len(layers)
