import os
import socket

import pytest
import torch

# Deterministic, quiet, and fair to a 2-core CI machine.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A very small training setup for recipe tests: seconds per run on 2 cores.
SMALL_RUN = [
    "model.overrides.num_layers=1", "model.overrides.embed_dim=64", "model.overrides.intermediate_dim=128",
    "data.num_docs=128", "data.seq_len=32", "batch_size=4", "progress_bar=false",
    "lr_scheduler.num_warmup_steps=2",
]


@pytest.fixture
def small_run(tmp_path):
    """Overrides for a seconds-long training run writing into a fresh directory."""
    return [*SMALL_RUN, f"output_dir={tmp_path / 'run'}"]


def free_port() -> int:
    """A free localhost TCP port for a test's own process group (gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_deploys_exactly(fake_quant_model, plain_model, meta: dict, scheme: str, vocab_size: int = 300):
    """``lowbit eval``'s deploy path (fp32) of a checkpoint's plain model + metadata gives the fake-quant
    model's logits bit for bit, with the recorded scheme."""
    from lowbit.eval.evaluate import prepare_for_inference

    x = torch.randint(0, vocab_size, (2, 16))
    with torch.no_grad():
        want = fake_quant_model(x)
        deployed, used = prepare_for_inference(plain_model, meta, dtype=torch.float32)
        got = deployed(x)
    assert used == scheme and torch.equal(want, got)
