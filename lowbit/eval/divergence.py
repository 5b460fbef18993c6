"""How far a (quantized) model's next-token distribution is from a reference model's, on the same text.

Reported the way llama.cpp's ``perplexity --kl-divergence`` reports it: the text is cut into windows of
``window`` tokens, the second half of each window is scored (every scored token sees at least
``window / 2`` tokens of context), and over those tokens: mean KL(reference || model) with its standard
error, the 99th percentile of KL, top-1 agreement (same argmax), and both models' perplexity. All in
float64 from each model's logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_windows(tokenizer, documents: list[str], window: int = 512,
                  max_windows: int | None = None) -> torch.Tensor:
    """``[n, window]`` int64: the documents tokenized (each after BOS) and concatenated, cut into windows."""
    ids: list[int] = []
    for doc in documents:
        ids += [tokenizer.bos_id, *tokenizer.encode(doc, add_bos=False, add_eos=False)]
        if max_windows is not None and len(ids) >= window * max_windows:
            break
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.no_grad()
def compare_to_reference(model, reference, windows: torch.Tensor, *, batch_size: int = 2) -> dict:
    """Divergence of ``model`` from ``reference`` (both: tokens ``[b, s]`` -> logits ``[b, s, vocab]``;
    ``reference`` may also be its logits on ``windows``, ``[n, s, vocab]``, computed once for many models).

    Returns ``kl_mean``, ``kl_stderr``, ``kl_p99``, ``top1_agreement``, ``top1_stderr``, ``ppl``,
    ``ppl_reference`` and ``tokens`` (the number of scored tokens).
    """
    if windows.dim() != 2 or windows.shape[1] < 4:
        raise ValueError(f"windows must be [n, s>=4] token ids, got shape {tuple(windows.shape)}")
    start = windows.shape[1] // 2
    kls, agree, nll, nll_ref = [], [], 0.0, 0.0
    for b in range(0, windows.shape[0], batch_size):
        x = windows[b:b + batch_size]
        target = x[:, start + 1:]
        lq = F.log_softmax(model(x)[:, start:-1].double(), -1)
        ref = reference[b:b + batch_size] if isinstance(reference, torch.Tensor) else reference(x)
        lp = F.log_softmax(ref[:, start:-1].double(), -1)
        if lq.shape[-1] != lp.shape[-1]:
            raise ValueError(f"vocabulary sizes differ: model {lq.shape[-1]}, reference {lp.shape[-1]}")
        kls.append((lp.exp() * (lp - lq)).sum(-1).flatten())
        agree.append((lp.argmax(-1) == lq.argmax(-1)).flatten().double())
        nll -= lq.gather(-1, target[..., None]).sum().item()
        nll_ref -= lp.gather(-1, target[..., None]).sum().item()
    kl, same = torch.cat(kls), torch.cat(agree)
    n = kl.numel()
    return {
        "kl_mean": kl.mean().item(), "kl_stderr": (kl.std() / math.sqrt(n)).item(),
        "kl_p99": kl.quantile(0.99).item(),
        "top1_agreement": same.mean().item(), "top1_stderr": (same.std() / math.sqrt(n)).item(),
        "ppl": math.exp(nll / n), "ppl_reference": math.exp(nll_ref / n), "tokens": n,
    }
