"""The recipes under torchrun with 2 CPU processes (gloo, FSDP2): equal to 1 process, DCP resharding.

2-rank runs go through the real launchers (``lowbit run RECIPE --nproc_per_node 2`` and
``tune run --nproc_per_node 2``); 1-rank runs run in this process.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lowbit.models.checkpoint import list_checkpoints
from lowbit.recipes.config import ConfigError
from lowbit.recipes.runner import run_recipe
from tests.conftest import SMALL_RUN

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[2]
RUN = [*SMALL_RUN, "max_steps=6", "checkpoint_every=3", "keep_last=2",
       "optimizer._component_=lowbit.optim.AdamW8bit", "optimizer.min_quant_size=1024"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(y), (a, b)  # fp32 reduction noise only


def run_two_ranks(launcher, recipe, config, overrides, env=None, check=True):
    if launcher == "lowbit":
        cmd = [sys.executable, "-m", "lowbit.cli", "run", recipe, "--nproc_per_node", "2",
               "--config", config]
    else:
        cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", "2",
               f"lowbit/recipes/{recipe}.py", "--config", f"lowbit/recipes/configs/{config}.yaml"]
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode:
        pytest.fail(f"2-rank run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def one_thread():
    """1-process reference runs use one thread, like each rank: matmuls then reduce in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def drop_last_checkpoint(src, dst):
    """A copy of run ``src`` as if it had stopped right after its first checkpoint (step 3)."""
    shutil.copytree(src, dst)
    for ckpt in list_checkpoints(dst)[1:]:
        shutil.rmtree(ckpt)
    assert [c.name for c in list_checkpoints(dst)] == ["step_000003"]
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    one = run_recipe("finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={tmp / 'one'}"])
    run_two_ranks("lowbit", "finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={tmp / 'two'}"])
    return tmp, one


def test_two_ranks_give_the_losses_of_one(runs):
    tmp, one = runs
    assert_same_losses(losses(tmp / "two"), losses(tmp / "one"))
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    # the 2-rank checkpoint is a plain model for eval, like the 1-rank one
    assert (list_checkpoints(tmp / "two")[-1] / "model.safetensors").exists()


def test_adamw8bit_state_per_rank_is_half(runs):
    tmp, _ = runs
    one = json.loads((tmp / "one" / "summary.json").read_text())["optimizer_state_bytes_per_rank"]
    two = json.loads((tmp / "two" / "summary.json").read_text())["optimizer_state_bytes_per_rank"]
    assert len(one) == 1 and len(two) == 2
    for per_rank in two:
        assert per_rank <= 0.5 * one[0] * 1.01, (two, one)


def test_dcp_resume_two_ranks_to_one(runs):
    tmp, one = runs
    resumed = drop_last_checkpoint(tmp / "two", tmp / "two_then_one")
    done = run_recipe("finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={resumed}", "resume=true"])
    assert done.step == 6
    assert_same_losses(losses(resumed), losses(tmp / "one"))


def test_dcp_resume_one_rank_to_two_through_tune_run(runs):
    tmp, _ = runs
    resumed = drop_last_checkpoint(tmp / "one", tmp / "one_then_two")
    run_two_ranks("tune", "finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={resumed}", "resume=true"])
    assert_same_losses(losses(resumed), losses(tmp / "two"))
    assert json.loads((resumed / "summary.json").read_text())["world_size"] == 2


def test_a_rank_dying_mid_checkpoint_leaves_the_previous_one(runs, tmp_path):
    """Rank 1 dies while writing the step-6 checkpoint: step 3 stays complete and resumes exactly."""
    _, one = runs
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import lowbit.recipes.checkpointing as c\n"
        "    real = c.dcp.save\n"
        "    def dying_save(state, checkpoint_id):\n"
        "        if checkpoint_id.endswith('step_000006/dcp'):\n"
        "            os.makedirs(checkpoint_id, exist_ok=True)\n"
        "            open(os.path.join(checkpoint_id, '__1_0.distcp'), 'wb').write(b'partial')\n"
        "            os._exit(1)\n"
        "        return real(state, checkpoint_id=checkpoint_id)\n"
        "    c.dcp.save = dying_save\n"
    )
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = run_two_ranks("lowbit", "finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={out}"], env=env,
                         check=False)
    assert proc.returncode != 0
    assert [c.name for c in list_checkpoints(out)] == ["step_000003"]
    done = run_recipe("finetune_recipe", "tiny_pretrain", [*RUN, f"output_dir={out}", "resume=true"])
    assert done.step == 6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_losses(losses(out), one.losses)


def test_resume_with_another_optimizer_or_model_says_which(runs, tmp_path):
    tmp, _ = runs
    run = drop_last_checkpoint(tmp / "one", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"optimizer\._component_ \(checkpoint 'lowbit\.optim\.AdamW8bit', "
                                          r"this run 'torch\.optim\.AdamW'\)"):
        run_recipe("finetune_recipe", "tiny_pretrain",
                   [*RUN, f"output_dir={run}", "resume=true", "optimizer._component_=torch.optim.AdamW",
                    "~optimizer.min_quant_size"])
    with pytest.raises(ConfigError, match=r"model\.overrides\.embed_dim \(checkpoint 64, this run 96\)"):
        run_recipe("finetune_recipe", "tiny_pretrain",
                   [*RUN, f"output_dir={run}", "resume=true", "model.overrides.embed_dim=96"])


@pytest.mark.parametrize("recipe,config,extra", [
    ("qat_recipe", "tiny_qat", ["qat.scheme=8da4w", "qat.group_size=32"]),
    ("qat_recipe", "tiny_qat", ["qat.scheme=8da4w", "qat.group_size=32", "qat.distill={ce_weight: 0.5}",
                                "qat.learn_ranges=true", "qat.ranges_lr=1e-3"]),  # teacher sharded too
    pytest.param("qat_recipe", "tiny_qat", ["qat.scheme=8da4w", "qat.group_size=32", "qat.distill={}",
                                            "qat.lora={rank: 4, alpha: 8}"],  # adapters sharded too
                 marks=pytest.mark.slow),  # make test-slow: keeps make test under 10 minutes
    ("finetune_recipe", "tiny_pretrain", ["float8.recipe=tensorwise", "float8.emulate=false"]),
])
def test_qat_and_float8_recipes_on_two_ranks(recipe, config, extra, tmp_path, one_thread):
    """QAT wrappers and Float8Linear under fully_shard train as on one process.

    The 1-process reference accumulates two micro-batches of 2 rows, the 2-rank run has one 2-row
    micro-batch per rank: the same rows, and the same per-micro-batch activation scales (float8's
    tensorwise scale is the amax of what a rank sees, by design, as in data-parallel training).
    """
    args = [a for a in RUN if not a.startswith("optimizer.min")] + extra
    args = [a.replace("lowbit.optim.AdamW8bit", "lowbit.optim.AdamW4bit") for a in args]
    one = run_recipe(recipe, config, [*args, "batch_size=2", "gradient_accumulation_steps=2",
                                      f"output_dir={tmp_path / 'one'}"])
    run_two_ranks("lowbit", recipe, config, [*args, f"output_dir={tmp_path / 'two'}"])
    # same rows per micro-batch, same reductions (FSDP's sum of two half-gradients is the accumulation's
    # sum), world-size-independent clipping and optimizer layout: bit-identical losses
    assert losses(tmp_path / "two") == one.losses
    meta = json.loads((list_checkpoints(tmp_path / "two")[-1] / "lowbit.json").read_text())
    if recipe == "qat_recipe":
        assert meta["qat_scheme"] == "8da4w"  # lowbit eval converts it like a 1-rank QAT checkpoint


def test_global_batch_not_divisible_by_ranks_says_so(tmp_path):
    proc = run_two_ranks("lowbit", "finetune_recipe", "tiny_pretrain",
                         [*RUN, "batch_size=3", f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2  # a usage error, as on one process; the launcher's last line is the cause
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"lowbit run: error: config key 'batch_size' \(3, the global batch\) must be "
                        r"divisible by the number of processes \(2\) \(rank [01]\)", last), last


@pytest.mark.slow  # make test-slow (CI runs it): keeps make test under 10 minutes
def test_float8_all_gather_and_scale_precompute_from_the_recipe(tmp_path, one_thread):
    """``float8.enable_fsdp_float8_all_gather`` and ``float8.precompute_float8_scales_for_fsdp`` on 2 ranks
    (emulated float8 on CPU): the hook runs after every optimizer step on every rank, each all-gather
    moves float8 bytes cast with the precomputed scale, and the losses equal the 1-process float8 run
    (which casts the whole weight itself) bit for bit."""
    # torch's AdamW: lowbit.optim's fused CPU step does not take the all-gather weight subclass yet
    args = [a for a in RUN if not a.startswith("optimizer.")] + ["optimizer._component_=torch.optim.AdamW"]
    f8 = ["float8.recipe=tensorwise", "float8.emulate=true"]
    one = run_recipe("finetune_recipe", "tiny_pretrain", [*args, *f8, "batch_size=2",
                                                          "gradient_accumulation_steps=2",
                                                          f"output_dir={tmp_path / 'one'}"])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if 'RANK' in os.environ:\n"
        "    log = os.path.join(os.environ['F8_LOG'], 'rank' + os.environ['RANK'])\n"
        "    import lowbit.float8.converter as c\n"
        "    import lowbit.float8.fsdp as f\n"
        "    real_pre, real_hook = (f.Float8AllGatherWeight.fsdp_pre_all_gather,\n"
        "                           c.precompute_float8_scales_for_fsdp)\n"
        "    def pre(self, mesh, outer_size, outer_stride, module, mp_policy):\n"
        "        fresh = self._precomputed is not None and self._precomputed[1] == self._tensor._version\n"
        "        out = real_pre(self, mesh, outer_size, outer_stride, module, mp_policy)\n"
        "        with open(log, 'a') as fh:\n"
        "            fh.write(f'gather {out[0][0].dtype} {fresh}\\n')\n"
        "        return out\n"
        "    def hook(model):\n"
        "        with open(log, 'a') as fh:\n"
        "            fh.write('hook\\n')\n"
        "        return real_hook(model)\n"
        "    f.Float8AllGatherWeight.fsdp_pre_all_gather = pre\n"
        "    c.precompute_float8_scales_for_fsdp = hook\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "F8_LOG": str(tmp_path)}
    run_two_ranks("lowbit", "finetune_recipe", "tiny_pretrain",
                  [*args, *f8, "float8.enable_fsdp_float8_all_gather=true",
                   "float8.precompute_float8_scales_for_fsdp=true", f"output_dir={tmp_path / 'two'}"],
                  env=env)
    assert losses(tmp_path / "two") == one.losses
    for rank in range(2):
        events = (tmp_path / f"rank{rank}").read_text().splitlines()
        assert events.count("hook") == 6  # max_steps
        gathers = [e for e in events if e.startswith("gather")]
        assert gathers and all(e.startswith("gather torch.uint8") for e in gathers)  # float8 bytes
        # before the first step nothing was precomputed; after it, every all-gather uses the hook's scale
        first_hook = events.index("hook")
        assert all(e.endswith("True") for e in events[first_hook:] if e.startswith("gather"))
