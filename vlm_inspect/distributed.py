"""Many processes with torch.distributed: ``torchrun --nproc_per_node=N -m vlm_inspect.train ...`` (data
parallelism) and ``torchrun ... -m vlm_inspect.evaluate ...`` (the samples sharded across ranks).

gloo on CPU, NCCL on GPU. Training averages gradients with one all-reduce of a flat buffer after each
backward (the same arithmetic as DistributedDataParallel, without wrapping the adapters, whose
forward is not ``model(x)``); evaluation gathers each rank's per-sample results. Only rank 0 writes
checkpoints, tables and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def teardown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_parameters(module: nn.Module, info: DistInfo) -> None:
    """Start every rank from rank 0's weights."""
    if info.world > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    if info.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def all_gather_objects(obj, info: DistInfo) -> list:
    if info.world <= 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out
