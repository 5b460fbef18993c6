"""The README's quickstart commands work as written, after ``make demo``, in a fresh directory.

Every command in the quickstart's ``bash`` blocks runs in order, in this process (``lowbit`` through
``lowbit.cli.main``, ``tune`` through torchtune's own CLI parser, as the console scripts do), with small
overrides appended so that it takes seconds: training runs get a tiny model and ``max_steps=2``,
``lowbit eval`` gets ``--limit``, ``lowbit bench`` the ``tiny`` preset in eager mode. A command that
needs the user's own files (``~/...``) is only parsed. A new command form in the quickstart fails
this test until it is given its overrides here.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL_RUN

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [*SMALL_RUN, "max_steps=2", "checkpoint_every=0"]
OVERRIDES = {  # command prefix -> arguments appended (later flags and key=value pairs win)
    ("tune", "run"): TRAIN,
    ("lowbit", "run"): TRAIN,
    ("lowbit", "eval"): ["--limit", "4", "--kl-windows", "1"],
    ("lowbit", "data"): ["--num-docs", "16", "--num-items", "8"],
    ("lowbit", "data", "cloze"): ["--num-items", "8"],
    ("lowbit", "convert"): [],
    ("lowbit", "bench"): ["--preset", "tiny", "--eager", "--prompt-len", "4", "--decode-tokens", "2",
                          "--repeats", "1", "--no-profile"],
}
# `make demo` runs on SmolLM2 (tests/demo/test_smollm2_demo.py); the tiny demo, smaller, stands in here
MAKE_DEMO = ["lowbit", "demo", "--model", "tiny", "--steps", "2", "--arms", "none", "--items", "8"]


def quickstart_commands(readme: str) -> list[str]:
    """The commands of the ``bash`` blocks between ``## Quickstart`` and the next ``## `` heading."""
    section = readme.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def run_command(words: list[str]) -> int:
    """Run ``lowbit ...`` or ``tune ...`` in this process; returns the exit code."""
    try:
        if words[0] == "lowbit":
            from lowbit.cli import main

            return main(words[1:])
        assert words[0] == "tune", words
        from torchtune._cli.tune import TuneCLIParser

        sys.argv = words
        parser = TuneCLIParser()
        parser.run(parser.parse_args())
        return 0
    except SystemExit as e:  # a recipe script ends with sys.exit(recipe_main())
        return 0 if e.code is None else e.code


def test_quickstart_parser_finds_the_commands():
    text = ("\n## Quickstart\n```bash\nlowbit run a \\\n  b=1   # note\n# a comment\n```\n"
            "## Next\n```bash\nx\n```")
    assert quickstart_commands(text) == ["lowbit run a    b=1"]


@pytest.mark.slow  # a few minutes: eleven commands, five lm-eval evaluations (two on SmolLM2)
def test_readme_quickstart_commands_run(tmp_path, monkeypatch):
    commands = quickstart_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("lowbit eval --checkpoint smollm2-135m") for c in commands)
    # a fresh directory holding the package, as a clone's root does (relative recipe paths resolve)
    (tmp_path / "lowbit").symlink_to(ROOT / "lowbit")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    assert run_command(MAKE_DEMO) == 0
    ran = []
    for command in commands:
        words = shlex.split(command)
        if any(w.startswith("~/") for w in words):
            continue  # the user's own model or data
        extra = OVERRIDES.get(tuple(words[:3]), OVERRIDES.get(tuple(words[:2])))
        if extra is None:
            pytest.fail(f"README quickstart command {command!r} has no overrides in {__file__}")
        assert run_command(words + extra) == 0, command
        ran.append(command)
    assert len(ran) == 11, ran
    assert (tmp_path / "lowbit_runs" / "tiny_qat" / "summary.json").exists()
    assert (tmp_path / "my_data" / "hellaswag_local.jsonl").exists()
    assert (tmp_path / "cloze.jsonl").exists() and (tmp_path / "smollm2_hf" / "config.json").exists()
