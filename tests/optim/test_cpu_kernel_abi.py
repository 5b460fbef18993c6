"""The Python side of the C ABI agrees with csrc/abi.h: modes, flag bits, the argument struct."""

import ctypes

from lowbit.optim import _cpu_kernel
from lowbit.optim.formats import FORMATS, FP32_MODE, RANK1

from . import kernel_testing


def test_modes_and_flags_come_from_the_header():
    assert _cpu_kernel.MODES == {
        "MODE_FP32": FP32_MODE,
        "MODE_Q8": FORMATS["8bit"].mode,
        "MODE_Q4": FORMATS["4bit"].mode,
        "MODE_FP8": FORMATS["fp8"].mode,
        "MODE_Q4_RANK1": RANK1.mode,
    }
    assert {f.name: f.value for f in _cpu_kernel.StepFlag} == {
        "MAXIMIZE": 1,
        "COUPLED": 2,
        "STOCHASTIC_ROUND": 4,
    }


def test_struct_size_matches_both_libraries(kernel):
    lib = kernel_testing.library()
    assert (
        lib.lowbit_test_step_args_size()
        == kernel.lowbit_step_args_size()
        == ctypes.sizeof(_cpu_kernel.StepArgs)
    )


def test_production_library_has_no_test_entry_points(kernel):
    assert not hasattr(kernel, "lowbit_encode_check") and not hasattr(kernel, "lowbit_test_adam_step")
    assert hasattr(kernel_testing.library(), "lowbit_test_adam_step")
