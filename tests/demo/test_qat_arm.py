import pytest

from lowbit.demo.qat_arm import recovered


def test_recovered_fraction():
    assert recovered(0.7660, 0.7066, 0.7651) == pytest.approx(0.9848, abs=1e-4)  # the published 8B numbers
    assert recovered(0.5, 0.5, 0.6) is None  # PTQ lost nothing: undefined, not a division by zero
