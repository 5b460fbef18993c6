"""The ``lowbit`` command: every ``--help`` exits 0 and prints no warning; torchao's two import-time
warnings are filtered and nothing else torchao logs is."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "eval", "bench", "demo", "data"]


def _lowbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_lowbit_help_prints_usage_and_no_warning():
    r = _lowbit("--help")
    assert r.returncode == 0
    assert r.stderr == ""
    for cmd in COMMANDS:
        assert f"lowbit {cmd}" in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_help_exits_0_without_warnings(cmd):
    r = _lowbit(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: lowbit {cmd}")
    assert r.stderr == ""


def test_unknown_command_and_no_command_exit_2():
    assert _lowbit().returncode == 2
    assert _lowbit("train").returncode == 2


def test_torchao_import_warnings_are_filtered_and_only_those():
    """A fresh interpreter importing lowbit's torchao users (and torchao's intmm, which logs the triton
    warning) shows nothing on stderr, while another torchao warning still gets through."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import lowbit.eval.quantize, lowbit.qat, lowbit.float8, torchao.kernel.intmm\n"
        "logging.getLogger('torchao').warning('another torchao warning')\n"
        "logging.getLogger('torchao.kernel.intmm').warning('Warning: Detected no triton (a new call)')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["WARNING:torchao:another torchao warning"]


def test_filter_is_idempotent():
    from lowbit import _torchao

    _torchao.install()
    _torchao.install()
    assert len(logging.getLogger("torchao").filters) == 1


def test_console_script_is_this_module():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lowbit": "lowbit.cli:main"}
