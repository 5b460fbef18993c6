"""Checksums of a checkpoint directory's files: written when the directory is committed, verified on load.

``checksums.json`` maps each file's path (relative to the checkpoint, ``/``-separated) to its size and
SHA-256. A file that is missing, of another size, or of another digest makes the checkpoint corrupt;
the error names the file and the checkpoint. Directories written before checksums existed have no
``checksums.json`` and are not verified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST_FILE = "checksums.json"
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file that does not match its recorded checksum, or cannot be parsed."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """Digests of ``paths``, several files at a time (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(sha256_of, paths))


def write_manifest(ckpt: Path) -> None:
    """Record the size and SHA-256 of every file under ``ckpt`` in ``ckpt/checksums.json``."""
    paths = [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256_all(paths))}
    (ckpt / MANIFEST_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_manifest(ckpt: Path, include: Callable[[str], bool] | None = None) -> bool:
    """Check the files of ``ckpt`` (those for which ``include(relative_path)`` holds) against its manifest.

    Returns False when ``ckpt`` has no manifest (an older checkpoint); raises
    :class:`CorruptCheckpointError` naming the file and the checkpoint on the first mismatch.
    """
    manifest = ckpt / MANIFEST_FILE
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {MANIFEST_FILE} is unreadable "
                                     f"({type(e).__name__})") from None
    entries = [e for e in entries if include is None or include(e[0])]
    for rel, size, _ in entries:  # the cheap checks first
        path = ckpt / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {rel} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {rel} has {actual} bytes, "
                                         f"{MANIFEST_FILE} recorded {size} (truncated or overwritten)")
    actual = _sha256_all([ckpt / rel for rel, _, _ in entries])
    for (rel, _, digest), got in zip(entries, actual):
        if got != digest:
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {rel} does not match its SHA-256 "
                                         f"in {MANIFEST_FILE}")
    return True
