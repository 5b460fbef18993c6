"""FSDP2 float8 all-gather (tensorwise) on CPU with gloo, 2 ranks: bit-identical to one device."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowbit.float8 import Float8TrainingConfig, convert_back, convert_to_float8_training
from lowbit.float8.fsdp import Float8AllGatherWeight, precompute_float8_scales_for_fsdp
from tests.conftest import free_port

WORLD = 2


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48, bias=False), nn.ReLU(), nn.Linear(48, 80), nn.ReLU(),
                         nn.Linear(80, 32, bias=False)).to(dtype)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, 32, generator=g) for _ in range(WORLD)]


def _worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        seen = []
        orig = Float8AllGatherWeight.fsdp_pre_all_gather

        def spy(self, mesh, outer_size, outer_stride, module, mp_policy):
            inputs, meta = orig(self, mesh, outer_size, outer_stride, module, mp_policy)
            fresh = self._precomputed is not None and self._precomputed[1] == self._tensor._version
            seen.append((inputs[0].dtype, fresh))
            return inputs, meta

        Float8AllGatherWeight.fsdp_pre_all_gather = spy

        config = Float8TrainingConfig.from_recipe("tensorwise", enable_fsdp_float8_all_gather=True)
        model = convert_to_float8_training(_model(), config=config)
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        weight_types = []
        model[0].register_forward_pre_hook(lambda m, args: weight_types.append(type(m.weight).__name__))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = _batches()[rank]
        results = {}
        for step in range(2):
            if step == 1:
                precompute_float8_scales_for_fsdp(model)
            y = model(x)
            y.sum().backward()
            results[f"y{step}"] = y.detach()
            results[f"grads{step}"] = [p.grad.full_tensor() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
        results["seen"] = seen
        results["weight_types"] = weight_types
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_fsdp2_float8_all_gather_matches_single_device(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # reference: the same float8 model on one device, data-parallel by hand (mean of per-batch grads)
    ref = convert_to_float8_training(_model(), config=Float8TrainingConfig.from_recipe("tensorwise"))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        per_rank = []
        for r, x in enumerate(_batches()):
            replica = copy.deepcopy(ref)
            y = replica(x)
            y.sum().backward()
            assert torch.equal(got[r][f"y{step}"], y.detach()), f"rank {r} step {step} output"
            per_rank.append([p.grad for p in replica.parameters()])
        mean = [sum(gs) / WORLD for gs in zip(*per_rank)]
        for r in range(WORLD):
            for a, b in zip(got[r][f"grads{step}"], mean):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for p, g in zip(ref.parameters(), mean):
            p.grad = g
        opt.step()
        opt.zero_grad()

    for r in range(WORLD):
        assert got[r]["weight_types"] == ["Float8GatheredWeight"] * 2  # the layer multiplies the float8 bytes
        seen = got[r]["seen"]
        assert seen and all(dtype == torch.uint8 for dtype, _ in seen)  # float8 bytes on the wire
        # step 0: no precomputed scale (all-reduce per weight); step 1: precomputed after the step
        assert not any(fresh for dtype, fresh in seen[: len(seen) // 2])
        assert all(fresh for dtype, fresh in seen[len(seen) // 2:])


def test_wrapped_weight_round_trips_and_computes_like_a_plain_one(tmp_path):
    from safetensors.torch import load_file, save_file

    config = Float8TrainingConfig.from_recipe("tensorwise", enable_fsdp_float8_all_gather=True)
    model = convert_to_float8_training(_model(), config=config)
    assert isinstance(model[0].weight, Float8AllGatherWeight)
    plain = convert_to_float8_training(_model(), config=Float8TrainingConfig.from_recipe("tensorwise"))
    x = _batches()[0]
    assert torch.equal(model(x), plain(x))
    sd = model.state_dict()
    assert all(type(v) is torch.Tensor and torch.equal(v, plain.state_dict()[k]) for k, v in sd.items())
    save_file(sd, str(tmp_path / "model.safetensors"))  # plain tensors: the checkpoint format works
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert isinstance(model[0].weight, Float8AllGatherWeight)
    convert_back(model)
    assert type(model[0].weight) is nn.Parameter and type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight, plain[0].weight)
