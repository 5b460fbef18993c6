"""The hand-off loses nothing: per-item choices of the fake-quant model equal the deployed model's."""

import pytest
import torch

from lowbit.data import generate_hellaswag, write_jsonl
from lowbit.eval.handoff import compare_handoff
from lowbit.recipes.runner import run_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import SMALL_RUN

    tmp = tmp_path_factory.mktemp("handoff")
    run = run_recipe(
        "finetune_recipe", "tiny_pretrain", [*SMALL_RUN, "max_steps=20", f"output_dir={tmp / 'run'}"]
    )
    task = tmp / "task.jsonl"
    write_jsonl(generate_hellaswag(24, seed=0), task)
    return run.output_dir, task


@pytest.mark.parametrize("scheme,dtype,tol", [
    ("8da4w", torch.float32, 0.0),   # the fp32 fake quant is bit-exact with torchao's 8da4w
    pytest.param("8w", torch.bfloat16, 0.0, marks=pytest.mark.slow),  # slow: make test stays < 10 min
    pytest.param("4w", torch.float32, 1e-4, marks=pytest.mark.slow),  # int4 kernel: its own sum order
])  # (all four schemes, both dtypes, on a trained model: benchmarks/bench_handoff.py)
def test_fake_quant_and_deployed_model_choose_the_same_endings(trained, scheme, dtype, tol):
    run, task = trained
    res = compare_handoff(run, scheme, dtype=dtype, task_file=task, group_size=32 if "4" in scheme else None)
    assert res["items"] == 24
    assert res["same_choice"] == res["items"]
    assert res["max_abs_ll_diff"] <= tol
    assert res["acc_norm_fake_quant"] == res["acc_norm_deployed"]


def test_lowbit_eval_passes_group_size_and_dtype(trained, monkeypatch, capsys):
    from lowbit import cli
    from lowbit.eval import deployment as deploy

    run, task = trained
    seen = []
    real = deploy.deploy

    def spy(model, scheme, **kw):
        seen.append((scheme, kw))
        return real(model, scheme, **kw)

    monkeypatch.setattr(deploy, "deploy", spy)
    assert (
        cli.main(
            [
                "eval",
                "--checkpoint",
                str(run),
                "--task-file",
                str(task),
                "--limit",
                "4",
                "--scheme",
                "8da4w",
                "--group-size",
                "64",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert seen == [("8da4w", {"group_size": 64, "dtype": torch.float32})]
    assert "scheme: 8da4w" in capsys.readouterr().out
