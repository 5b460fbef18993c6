"""Offline data: the generated corpus and hellaswag-format task, and loaders for a user's own data."""

from lowbit.data.loaders import load_texts, pack_documents, read_jsonl
from lowbit.data.synthetic import generate_corpus, generate_hellaswag, write_jsonl
from lowbit.data.world import World, make_world

__all__ = [
    "World", "generate_corpus", "generate_hellaswag", "load_texts", "make_world", "pack_documents",
    "read_jsonl", "write_jsonl",
]
