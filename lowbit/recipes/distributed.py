"""Running a recipe on several processes: torchrun's environment, the process group, FSDP2 sharding.

A recipe launched by ``torchrun`` (``lowbit run RECIPE --nproc_per_node N ...`` or ``tune run
--nproc_per_node N ...``) sees ``WORLD_SIZE > 1`` and shards the model with FSDP2
(``fully_shard`` on every decoder layer, then on the root). Launched plainly, nothing here touches
``torch.distributed``: one process, plain tensors.

Backends: gloo for CPU, NCCL for CUDA (with gloo alongside for the CPU-side barriers and broadcasts).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lowbit.recipes.config import ConfigError


@dataclass
class Runtime:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``; ``mesh`` when sharded."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a per-rank float over all ranks (the float itself on one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str | None) -> str:
    """``cpu``, ``cuda``, or null/``auto`` for CUDA when available, else CPU."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'device' must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but torch sees no CUDA device (use device=cpu)")
    return name


def init_runtime(device_name: str | None) -> Runtime:
    """Join the process group if launched by torchrun with more than one process."""
    kind = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(device=torch.device(kind))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(kind, (world,))
    return Runtime(rank=rank, world_size=world, device=device, mesh=mesh)


def shard_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, norm, output)."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model, "layers", []):
        fully_shard(layer, mesh=rt.mesh)
    fully_shard(model, mesh=rt.mesh)
    return model


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, rt: Runtime) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    As ``torch.nn.utils.clip_grad_norm_``, but the sum of squares is accumulated in float64 over each
    rank's shard and all-reduced, so the norm (and the clip factor, rounded to fp32 once) does not
    depend on how the gradients are sharded: fp32 partial norms of different shards differ by a few
    ulp, which fake quantization then amplifies into different runs.
    """
    from torch.distributed.tensor import DTensor, Replicate

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64, device=rt.device)
    replicated = torch.zeros((), dtype=torch.float64, device=rt.device)
    for g in grads:
        if isinstance(g, DTensor):
            sq = g.to_local().double().square().sum()
            if all(isinstance(pl, Replicate) for pl in g.placements):
                replicated += sq
            else:
                sharded += sq
        else:
            replicated += g.double().square().sum()
    if rt.distributed:
        dist.all_reduce(sharded)
    norm = float((sharded + replicated).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        factor = torch.tensor(coef, dtype=torch.float32).item()
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(factor)
    return norm
