import hashlib
import json

import pytest

from lowbit.models.checkpoint import atomic_dir
from lowbit.models.checksums import MANIFEST_FILE, CorruptCheckpointError, verify_manifest


@pytest.fixture
def ckpt(tmp_path):
    with atomic_dir(tmp_path / "step_000001") as d:
        (d / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "tokenizer.json").write_text('{"model": {}}')
    return tmp_path / "step_000001"


def test_manifest_records_size_and_sha256_of_every_file(ckpt):
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == ["tokenizer/tokenizer.json", "weights.bin"]
    data = (ckpt / "weights.bin").read_bytes()
    assert files["weights.bin"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_manifest(ckpt) is True


def test_each_kind_of_corruption_names_file_and_checkpoint(ckpt):
    weights = ckpt / "weights.bin"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit, same size
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {ckpt} is corrupt: weights\.bin does not "
                                                     r"match its SHA-256 in checksums\.json"):
        verify_manifest(ckpt)
    assert verify_manifest(ckpt, include=lambda rel: rel.startswith("tokenizer/"))  # only what is asked for
    weights.write_bytes(good[:1000])
    with pytest.raises(CorruptCheckpointError,
                       match=r"weights\.bin has 1000 bytes, checksums\.json recorded 16384"):
        verify_manifest(ckpt)
    weights.unlink()
    with pytest.raises(CorruptCheckpointError, match=r"weights\.bin is missing"):
        verify_manifest(ckpt)
    (ckpt / MANIFEST_FILE).write_text("{garbage")
    with pytest.raises(CorruptCheckpointError, match=r"checksums\.json is unreadable"):
        verify_manifest(ckpt)
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_manifest(ckpt) is False  # an older checkpoint: nothing to verify against
