import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def books():
    """Codebooks built independently of lowbit: torchao's maps and the plain linear map."""
    from torchao.optim.quant_utils import create_dynamic_map

    def arr(v):
        return np.array(v, dtype=np.float32)

    return {
        "dynamic8_signed": arr(create_dynamic_map(True, 7, 8)),
        "dynamic8_unsigned": arr(create_dynamic_map(False, 7, 8)),
        "dynamic4_signed": arr(create_dynamic_map(True, 3, 4)),
        "linear4_unsigned": np.arange(1, 17, dtype=np.float32) / np.float32(16),
    }


@pytest.fixture
def kernel():
    """The built CPU kernel library (skips where it cannot be built)."""
    from lowbit.optim import _cpu_kernel

    lib = _cpu_kernel.get()
    if lib is None:
        pytest.skip("CPU kernel unavailable")
    return lib


@pytest.fixture
def no_kernel(monkeypatch):
    """Force the pure-torch step."""
    from lowbit.optim import _cpu_kernel

    monkeypatch.setattr(_cpu_kernel, "_lib", None)
    monkeypatch.setattr(_cpu_kernel, "_failed", "disabled by test")


def seed_all(s=0):
    torch.manual_seed(s)
    np.random.seed(s)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core runner, OpenMP teams of 2 stall on busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
