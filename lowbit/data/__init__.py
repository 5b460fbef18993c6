"""Offline data: the generated corpus and hellaswag-format task, and loaders for a user's own data."""

from lowbit.data.loaders import DataError, check_data_file, load_texts, pack_documents, read_jsonl
from lowbit.data.synthetic import generate_corpus, generate_hellaswag, write_jsonl
from lowbit.data.world import World, make_world

__all__ = [
    "DataError", "World", "check_data_file", "generate_corpus", "generate_hellaswag", "load_texts",
    "make_world", "pack_documents", "read_jsonl", "write_jsonl",
]
