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
from torchtune.modules import TransformerDecoder
from tqdm import tqdm


class LowbitLM(TemplateLM):
    """lm-eval model wrapping ``model`` (tokens ``[b, s]`` int64 -> logits ``[b, s, vocab]``).

    Args:
        model: a torchtune ``TransformerDecoder`` (possibly quantized / compiled).
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``decode``, ``bos_id``,
            ``eos_id``).
        batch_size: rows per forward pass, as lm-eval's ``--batch_size``.
        max_length: longest sequence fed to the model (default: the model's ``max_seq_len``).
        token_budget: tokens per forward pass, padding included (default ``batch_size * row_tokens``).
        row_tokens: length of the packed rows that loglikelihood requests are scored in.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_length: int | None = None,
                 token_budget: int | None = None, row_tokens: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.row_tokens = row_tokens
        self.token_budget = token_budget or batch_size * row_tokens
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

    def _split(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], list[int]]:
        """(prefix, continuation) of one request: BOS + context, left-truncated so that the model input
        (prefix + continuation minus its last token) fits ``max_length``."""
        if not context or context[0] != self.prefix_token_id:
            context = [self.prefix_token_id, *context]
        whole = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        return tuple(whole[:-n]), whole[-n:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """For each ``(key, context_ids, continuation_ids)``: (sum of continuation log-probs, greedy?).

        Requests that share a context (the endings of one multiple-choice item) form a *group*: the
        context once, then every continuation, each attending to the context and to itself only, with
        positions restarting after the context, so each is scored exactly as if alone. Groups are packed
        into rows of up to ``row_tokens`` tokens (block-diagonal attention between groups), rows are
        batched by ``token_budget``, and the vocabulary projection runs only where a continuation token
        is predicted.
        """
        by_prefix: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            prefix, cont = self._split(ctx, cont)
            by_prefix.setdefault(prefix, []).append((i, cont))
        groups = list(by_prefix.items())  # (prefix, members); positions stay below max_length
        rows = _first_fit(groups, max(self.row_tokens, max(_size(g) for g in groups)))
        budget = self.token_budget
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches, batch = [], []
        for row in rows:  # longest first
            if batch and (len(batch) + 1) * sum(_size(g) for g in batch[0]) > budget:
                batches.append(batch)
                batch = []
            batch.append(row)
        batches.append(batch)
        for batch in tqdm(batches, disable=disable_tqdm, desc="loglikelihood"):
            for i, score in self._score_rows(batch):
                results[i] = score
        return results

    @torch.no_grad()
    def _score_rows(self, batch):
        """Score one batch of packed rows; yields ``(request index, (log-likelihood, greedy))``."""
        width = max(sum(_size(g) for g in row) for row in batch)
        tokens = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        grp = torch.full((len(batch), width), -1, dtype=torch.long)  # group within the row; -1: padding
        seg = torch.zeros((len(batch), width), dtype=torch.long)  # 0: the group's prefix, j: continuation j
        where, targets, owners = [], [], []  # flat positions predicting each continuation's tokens
        for b, row in enumerate(batch):
            at = 0
            for g, (prefix, members) in enumerate(row):
                n = len(prefix)
                tokens[b, at:at + n] = torch.tensor(prefix)
                pos[b, at:at + n] = torch.arange(n)
                grp[b, at:at + n] = g
                last, start = at + n - 1, at + n
                for j, (i, cont) in enumerate(members, start=1):
                    k = len(cont) - 1  # the last token is only a target, never an input
                    tokens[b, start:start + k] = torch.tensor(cont[:-1])
                    pos[b, start:start + k] = torch.arange(n, n + k)
                    grp[b, start:start + k] = g
                    seg[b, start:start + k] = j
                    # cont[0] is predicted at the prefix's last position, cont[t] at cont[t - 1]'s.
                    where.append([b * width + last, *range(b * width + start, b * width + start + k)])
                    targets.append(cont)
                    owners.append(i)
                    start += k
                at = start
        r = torch.arange(width)
        causal = r[None, :, None] >= r[None, None, :]
        same_group = (grp[:, :, None] == grp[:, None, :]) & (grp[:, :, None] >= 0)
        visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        mask = (causal & same_group & visible) | torch.eye(width, dtype=torch.bool)  # padding sees itself
        flat = torch.tensor([p for w in where for p in w])
        logprobs = F.log_softmax(self._logits_at(tokens, mask, pos, flat).double(), dim=-1)  # float64 sums
        target = torch.tensor([t for c in targets for t in c], device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        greedy = logprobs.argmax(-1) == target
        at = 0
        for i, cont in zip(owners, targets):
            k = len(cont)
            yield i, (picked[at:at + k].sum().item(), bool(greedy[at:at + k].all()))
            at += k

    def _logits_at(self, tokens, mask, input_pos, flat_positions) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` at ``flat_positions`` of ``tokens`` ``[b, s]`` (row-major)."""
        tokens, mask, input_pos = (t.to(self._device) for t in (tokens, mask, input_pos))
        model = self.model
        if isinstance(model, TransformerDecoder):  # skip the vocabulary projection where unused
            h = model.tok_embeddings(tokens)
            for layer in model.layers:
                h = layer(h, mask=mask, input_pos=input_pos)
            return model.unembed(h.flatten(0, 1)[flat_positions.to(h.device)][None])[0].float()
        out = model(tokens, mask=mask, input_pos=input_pos)
        return out.flatten(0, 1)[flat_positions.to(out.device)].float()

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


def _size(group) -> int:
    """Tokens a group feeds the model: its prefix, then each continuation but its last token."""
    prefix, members = group
    return len(prefix) + sum(len(c) - 1 for _, c in members)


def _first_fit(groups: list, capacity: int) -> list[list]:
    """Pack groups (largest first) into rows of at most ``capacity`` tokens; rows longest first."""
    rows: list[list] = []
    room: list[int] = []
    for g in sorted(groups, key=lambda g: -_size(g)):
        n = _size(g)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(g)
                room[r] -= n
                break
        else:
            rows.append([g])
            room.append(capacity - n)
    return sorted(rows, key=lambda row: -sum(_size(g) for g in row))
