"""An lm-eval model over any torchtune decoder + tokenizer (no ``transformers``, nothing downloaded).

``LowbitLM`` subclasses ``lm_eval.api.model.TemplateLM``: lm-eval splits requests into context /
continuation token ids, and this class scores them with one forward pass per batch. Every sequence
starts with the tokenizer's BOS, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm


class LowbitLM(TemplateLM):
    """lm-eval model wrapping ``model`` (tokens ``[b, s]`` int64 -> logits ``[b, s, vocab]``).

    Args:
        model: a torchtune ``TransformerDecoder`` (possibly quantized / compiled).
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``decode``, ``bos_id``,
            ``eos_id``).
        batch_size: sequences per forward pass.
        max_length: longest sequence fed to the model (default: the model's ``max_seq_len``).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model, "max_seq_len", 2048)
        self._device = next(iter(model.parameters()), torch.empty(0)).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_bos=False, add_eos=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[b, s, vocab]`` for int64 ``tokens`` ``[b, s]``."""
        return self.model(tokens.to(self._device)).float()

    def _score(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """Model input (BOS + context + continuation, minus the last token, left-truncated) and the
        number of continuation tokens it predicts."""
        if not context or context[0] != self.prefix_token_id:
            context = [self.prefix_token_id, *context]
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-1], len(continuation)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """For each ``(key, context_ids, continuation_ids)``: (sum of continuation log-probs, greedy?)."""
        prepared = [self._score(ctx, cont) + (cont,) for _, ctx, cont in requests]
        # Longest first: batches of similar length waste little padding.
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        pad = self.eot_token_id
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            idx = order[start:start + self.batch_size]
            width = len(prepared[idx[0]][0])
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            for row, i in enumerate(idx):
                inp = prepared[i][0]
                batch[row, : len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(self.logits(batch).double(), dim=-1)  # float64: sums of many tokens
            for row, i in enumerate(idx):
                inp, n, cont = prepared[i]
                lp = logprobs[row, len(inp) - n: len(inp)]  # positions predicting the continuation
                target = torch.tensor(cont[-n:], device=lp.device)
                results[i] = (
                    lp.gather(-1, target[:, None]).sum().item(),
                    bool((lp.argmax(-1) == target).all()),
                )
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of ``max_length`` tokens."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling"):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string or ``max_gen_toks`` tokens (no KV cache: eval only)."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate"):
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 128))
            tokens = [self.prefix_token_id, *self.tok_encode(context)]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                window = torch.tensor([(tokens + generated)[-self.max_length:]])
                nxt = int(self.logits(window)[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                generated.append(nxt)
                text = self.tok_decode(generated)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out
