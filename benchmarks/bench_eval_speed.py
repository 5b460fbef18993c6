"""lm-eval scoring speed on the real model: the packed scorer vs the adapter it replaced, same items, one run.

Both score the same hellaswag-format cloze items (built from Python's documentation) through lm-eval's
own hellaswag pipeline, fp32 eager, interleaved rounds. Prints tokens/s of each (tokens = context +
continuation of every request, the work the old adapter did), their ratio, and whether every item's
``acc`` and ``acc_norm`` choice is identical.

    python benchmarks/bench_eval_speed.py --items 300 --rounds 1
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.eval.bench import cpu_description
from lowbit.eval.evaluate import evaluate
from lowbit.eval.lm_eval_adapter import LowbitLM
from lowbit.eval.tasks import cloze_file
from lowbit.models.checkpoint import load_checkpoint


class PreviousLM(LowbitLM):
    """The scorer before packing: one padded row per request, logits and float64 log-softmax over every
    position, fixed ``batch_size`` rows, longest first (kept verbatim as the baseline)."""

    def _score(self, context, continuation):
        if not context or context[0] != self.prefix_token_id:
            context = [self.prefix_token_id, *context]
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-1], len(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        prepared = [self._score(ctx, cont) + (cont,) for _, ctx, cont in requests]
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results = [None] * len(prepared)
        pad = self.eot_token_id
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            idx = order[start:start + self.batch_size]
            width = len(prepared[idx[0]][0])
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            for row, i in enumerate(idx):
                inp = prepared[i][0]
                batch[row, : len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(self.logits(batch).double(), dim=-1)
            for row, i in enumerate(idx):
                inp, n, cont = prepared[i]
                lp = logprobs[row, len(inp) - n: len(inp)]
                target = torch.tensor(cont[-n:], device=lp.device)
                results[i] = (lp.gather(-1, target[:, None]).sum().item(),
                              bool((lp.argmax(-1) == target).all()))
        return results


class Counting:
    """Wraps an LM class so that the tokens of its requests are counted."""

    def __init__(self, cls):
        self.tokens = 0
        counter = self

        class Counted(cls):
            def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
                counter.tokens += sum(len(c) + len(t) + 1 for _, c, t in requests)
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)

        self.cls = Counted


def run(arm: str, model, tok, task_file, limit):
    counting = Counting(PreviousLM if arm == "previous" else LowbitLM)
    ev = importlib.import_module("lowbit.eval.evaluate")

    saved = ev.LowbitLM
    ev.LowbitLM = counting.cls
    try:
        t = time.perf_counter()
        res = evaluate(model=model, tokenizer=tok, task_file=task_file, limit=limit, scheme="none",
                       log_samples=True, batch_size=32)
        dt = time.perf_counter() - t
    finally:
        ev.LowbitLM = saved
    samples = res["samples"]["hellaswag_local"]
    choices = [(s["doc_id"], s["acc"], s["acc_norm"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    return counting.tokens / dt, dt, res["results"]["hellaswag_local"], choices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="smollm2-135m")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{cpu_description()}; threads {a.threads}; checkpoint {a.checkpoint}; {a.items} cloze items "
          "(python-docs)")
    model, tok, _ = load_checkpoint(a.checkpoint)
    task_file = cloze_file("python-docs", num_items=a.items)
    speeds = {"previous": [], "packed": []}
    for r in range(a.rounds):
        out = {}
        for arm in ("previous", "packed") if r % 2 == 0 else ("packed", "previous"):
            tps, dt, metrics, choices = run(arm, model, tok, task_file, None)
            speeds[arm].append(tps)
            out[arm] = choices
            print(f"round {r} {arm:9s} {tps:8.1f} tokens/s  {dt:6.1f} s  acc {metrics['acc,none']:.4f} "
                  f"acc_norm {metrics['acc_norm,none']:.4f}")
        same = sum(x == y for x, y in zip(out["previous"], out["packed"]))
        print(f"round {r}: identical acc/acc_norm choices on {same}/{len(out['packed'])} items")
    best = {k: max(v) for k, v in speeds.items()}
    print(f"speedup packed / previous (best of {a.rounds}): {best['packed'] / best['previous']:.2f}x")


if __name__ == "__main__":
    main()
