"""Low-bit optimizers on DTensor parameters (2 gloo ranks): bit-identical to one process.

Fixed gradients, so any difference is the optimizer's: the block layout and what is quantized must be
those of the global tensor whatever the sharding (aligned shards step locally; misaligned ones
all-gather), and the state must hold exactly what a single-process optimizer holds.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.optim import AdamW4bit, AdamW8bit, AdamWFp8
from tests.conftest import free_port

WORLD = 2
# (shape, placement dim): aligned row shards, misaligned ones, an empty shard, a column shard, fp32 state
CASES = [
    ((64, 128), 0),
    ((33, 256), 0),
    ((100, 50), 0),
    ((3, 4096), 0),
    ((1, 8192), 0),
    ((256, 64), 1),
    ((10, 10), 0),
    ((4097,), 0),
]
# where each rank's 8-bit state lives (block 256, 2 ranks, torch.chunk-style row shards):
LOCAL_STATE = {
    (64, 128): True,  # 32 rows = 4096 elements = 16 blocks per rank: the state splits with the rows
    (
        33,
        256,
    ): False,  # rows 17 / 16: rank 0 holds 17 blocks, but a 2-way chunk of 33 blocks gives it 17 and of
    #                    the 8448 codes 4224 (not 17 * 256): the state cannot split like the rows
    (100, 50): False,  # 50 rows = 2500 elements: rank 1 starts inside a block
    (3, 4096): False,  # rows 2 / 1: rank 0 holds 32 of 48 blocks, a 2-way chunk gives 24
    (1, 8192): False,  # rows 1 / 0: rank 0 holds all 32 blocks
    (256, 64): False,  # a column shard is not a contiguous range of the flat tensor
    (10, 10): True,  # 100 elements: fp32 state shaped and sharded like the parameter
    (4097,): False,  # 2049 / 2048 elements: rank 1 starts inside a block
}
OPTIMS = {"AdamW8bit": AdamW8bit, "AdamW4bit": AdamW4bit, "AdamWFp8": AdamWFp8}
STEPS = 3


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for shape, _ in CASES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=g) * (10.0 ** (i % 3 - 1)) for i, (shape, _) in enumerate(CASES)]


def _single_process(name):
    params = [torch.nn.Parameter(t) for t in _params()]
    opt = OPTIMS[name](params, lr=1e-2, weight_decay=0.1)
    history = []
    for step in range(STEPS):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def _full(v):
    """The global tensor of a DTensor state (gloo cannot gather float8: gather the bytes)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(v, DTensor):
        return v
    if v.dtype == torch.float8_e4m3fn:
        as_bytes = DTensor.from_local(
            v.to_local().view(torch.uint8), v.device_mesh, v.placements, shape=v.shape, stride=v.stride()
        )
        return as_bytes.full_tensor().view(v.dtype)
    return v.full_tensor()


def _worker(rank, port, out_dir, arms):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for name, backend in arms:
            os.environ["LOWBIT_OPTIM_BACKEND"] = backend
            cls = OPTIMS[name]
            params = [
                torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(d)]))
                for t, (_, d) in zip(_params(), CASES)
            ]
            opt = cls(params, lr=1e-2, weight_decay=0.1)
            history = []
            for step in range(STEPS):
                for p, g, (_, d) in zip(params, _grads(step), CASES):
                    p.grad = distribute_tensor(g, mesh, [Shard(d)])
                opt.step()
                history.append([p.full_tensor() for p in params])
            state = [{k: _full(v) for k, v in opt.state[p].items()} for p in params]
            local_bytes = [
                sum(t.to_local().numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
                for p in params
            ]
            # a full single-process state dict loads into the sharded optimizer and steps identically
            os.environ["LOWBIT_OPTIM_BACKEND"] = "auto"
            ref_history, ref_opt = _single_process(name)
            os.environ["LOWBIT_OPTIM_BACKEND"] = backend
            params2 = [
                torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(d)]))
                for t, (_, d) in zip(ref_history[-1], CASES)
            ]
            opt2 = cls(params2, lr=1e-2, weight_decay=0.1)
            opt2.load_state_dict(ref_opt.state_dict())
            for p, g, (_, d) in zip(params2, _grads(STEPS), CASES):
                p.grad = distribute_tensor(g, mesh, [Shard(d)])
            opt2.step()
            results[name, backend] = {
                "history": history,
                "state": state,
                "local_bytes": local_bytes,
                "after_load": [p.full_tensor() for p in params2],
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# every optimizer with the default (C++) step, and the Triton kernels (interpreted) for one
ARMS = [(name, "auto") for name in OPTIMS] + ([("AdamW4bit", "triton")] if _has_triton() else [])


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(free_port(), str(out), ARMS), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
@pytest.mark.parametrize("name,backend", ARMS)
def test_sharded_step_is_bit_identical_to_one_process(name, backend, sharded_results):
    """Each rank's shards, stepped by the default backend (or the Triton kernels), equal one process."""
    ref_history, ref_opt = _single_process(name)
    ref_params = list(ref_opt.param_groups[0]["params"])
    for r in range(WORLD):
        got = sharded_results[r][name, backend]
        for step in range(STEPS):
            for i, (a, b) in enumerate(zip(got["history"][step], ref_history[step])):
                assert torch.equal(a, b), f"rank {r} step {step} param {CASES[i]}"
        for i, (st, p) in enumerate(zip(got["state"], ref_params)):
            ref_st = ref_opt.state[p]
            assert set(st) == set(ref_st), CASES[i]
            for k in st:
                assert st[k].dtype == ref_st[k].dtype and torch.equal(
                    st[k].view(torch.uint8) if st[k].dtype == torch.float8_e4m3fn else st[k],
                    ref_st[k].view(torch.uint8) if ref_st[k].dtype == torch.float8_e4m3fn else ref_st[k],
                ), (CASES[i], k)

    # one more reference step from the loaded state
    params = [torch.nn.Parameter(t.clone()) for t in ref_history[-1]]
    opt = OPTIMS[name](params, lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(ref_opt.state_dict())
    for p, g in zip(params, _grads(STEPS)):
        p.grad = g
    opt.step()
    for r in range(WORLD):
        for i, (a, b) in enumerate(zip(sharded_results[r][name, backend]["after_load"], params)):
            assert torch.equal(a, b.detach()), f"after loading a full state dict: rank {r} param {CASES[i]}"


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_aligned_shards_hold_half_the_state(sharded_results):
    _, ref_opt = _single_process("AdamW8bit")
    ref_bytes = [
        sum(t.numel() * t.element_size() for k, t in ref_opt.state[p].items() if k != "step")
        for p in ref_opt.param_groups[0]["params"]
    ]
    for i, (shape, _) in enumerate(CASES):
        per_rank = [sharded_results[r]["AdamW8bit", "auto"]["local_bytes"][i] for r in range(WORLD)]
        if LOCAL_STATE[shape]:  # each rank holds its half
            assert per_rank == [ref_bytes[i] // 2] * 2, shape
        else:  # replicated: each rank holds all of it
            assert per_rank == [ref_bytes[i]] * 2, shape
