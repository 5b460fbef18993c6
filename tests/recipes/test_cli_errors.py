"""`lowbit run` on the user's mistakes: the cause as the last line of stderr, no traceback, and a status
(2: usage, 1: bad data or a corrupt checkpoint). Runs `lowbit.cli.main` in this process, through
torchtune's `tune run`, as the console script does."""

import sys

import pytest

from lowbit.cli import main

# `tune run` executes the recipe module as __main__ although this process has imported it: intended here
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")


def lowbit(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lowbit"])  # `lowbit run` hands sys.argv to `tune run`
    try:
        status = main(argv)
    except SystemExit as e:  # the recipe's own entry point exits with its status
        status = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1]


def test_bad_value_exits_2_naming_the_key_and_writes_nothing(tmp_path, small_run, monkeypatch, capsys):
    status, last = lowbit(["run", "finetune_recipe", "--config", "tiny_pretrain", *small_run,
                           "max_steps=2.5"], monkeypatch, capsys)
    assert status == 2
    assert last == ("lowbit: error: config key 'max_steps' in the command-line override 'max_steps=2.5': "
                    "expected an int >= 1, got 2.5 (float)")
    assert not (tmp_path / "run").exists()
    status, last = lowbit(["run", "nope_recipe", "--config", "tiny_pretrain"], monkeypatch, capsys)
    assert status == 2 and last.startswith("lowbit run: error: unknown recipe 'nope_recipe'")


def test_bad_data_exits_1_naming_file_and_line(tmp_path, small_run, monkeypatch, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "a fine document"}\n{"text": 42}\n')
    status, last = lowbit(["run", "finetune_recipe", "--config", "tiny_pretrain", *small_run, "max_steps=1",
                           f"data.source={data}"], monkeypatch, capsys)
    assert status == 1
    assert last == f"lowbit: error: {data}:2: field 'text' is int 42, expected a string"
