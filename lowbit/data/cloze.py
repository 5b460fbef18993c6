"""Hellaswag-format cloze items built from any real text.

An item is a sentence from a passage: the context is the (up to two) sentences before it plus the first
words of the sentence (``ctx_a``; ``ctx_b`` stays empty, which lm-eval's hellaswag preprocessing strips),
the true ending is the rest of the sentence, and the three wrong endings are sentence ends taken from *other*
passages, the ones nearest in length (so length alone does not give the answer). Items are scored by
lm-eval's own hellaswag pipeline (``acc``, ``acc_norm``).
"""

from __future__ import annotations

import random
import re

from lowbit.data.loaders import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_LEAD_WORDS = 3
_NUM_ENDINGS = 4


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _usable(sentence: str) -> bool:
    # lm-eval's hellaswag preprocessing deletes "[...]"; keep sentences it leaves intact.
    words = sentence.split()
    return (6 <= len(words) <= 40 and 30 <= len(sentence) <= 240
            and "[" not in sentence and "]" not in sentence)


def cloze_candidates(paragraphs: list[str]) -> list[tuple[int, str, str]]:
    """``(paragraph index, context, true ending)`` for every usable sentence that follows a sentence of
    its paragraph (the context: up to two sentences before it, at most 400 characters); the target
    sentences of two candidates are never adjacent, and a repeated paragraph is used once."""
    out, seen = [], set()
    for pi, paragraph in enumerate(paragraphs):
        sents = _sentences(paragraph)
        if paragraph in seen:  # documentation repeats passages: one item per text
            continue
        seen.add(paragraph)
        i = 1
        while i < len(sents):
            prev, sent = " ".join(sents[max(0, i - 2):i]), sents[i]
            if len(prev) > 400:
                prev = sents[i - 1]
            words = sent.split()
            context, ending = f"{prev} {' '.join(words[:_LEAD_WORDS])}", " ".join(words[_LEAD_WORDS:])
            if len(prev) >= 20 and _usable(sent) and context not in seen and ending not in seen:
                seen.update((context, ending))
                out.append((pi, context, ending))
                i += 2
            else:
                i += 1
    return out


def cloze_items(paragraphs: list[str], num_items: int, *, seed: int = 0, label: str = "Text",
                source: str = "the text") -> list[dict]:
    """``num_items`` hellaswag-format items (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``,
    ``label``) from ``paragraphs``; deterministic for the same text and seed.

    Raises :class:`~lowbit.data.loaders.DataError` naming ``source`` when the text holds fewer usable
    sentences than asked for.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    cands = cloze_candidates(paragraphs)
    if len(cands) < max(num_items, _NUM_ENDINGS):
        raise DataError(f"{source} is too short for {num_items} cloze items: it has {len(cands)} usable "
                         "sentences (6-40 words, following another sentence of the same paragraph)")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(cands)), num_items))
    by_length = sorted(range(len(cands)), key=lambda i: (len(cands[i][2]), i))
    rank = {c: r for r, c in enumerate(by_length)}
    golds = [k % _NUM_ENDINGS for k in range(num_items)]  # every position equally often
    rng.shuffle(golds)
    items = []
    for ci, gold in zip(chosen, golds):
        para, context, ending = cands[ci]
        # The nearest-length endings from other paragraphs, alternating shorter / longer.
        wrong, lo, hi = [], rank[ci] - 1, rank[ci] + 1
        while len(wrong) < _NUM_ENDINGS - 1:
            for r in (lo, hi):
                if 0 <= r < len(by_length) and len(wrong) < _NUM_ENDINGS - 1:
                    other = cands[by_length[r]]
                    if other[0] != para and other[2] != ending and other[2] not in wrong:
                        wrong.append(other[2])
            lo, hi = lo - 1, hi + 1
            if lo < 0 and hi >= len(by_length):
                raise DataError(f"{source}: not enough distinct endings from other passages")
        endings = wrong[:gold] + [ending] + wrong[gold:]
        items.append({"activity_label": label, "ctx_a": context, "ctx_b": "", "endings": endings,
                      "label": str(gold), "source_paragraph": para})
    return items
