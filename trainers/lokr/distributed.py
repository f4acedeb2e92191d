"""torchrun data parallelism: process group set-up, one gradient all-reduce per optimizer step.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins a process group —
nccl on GPUs, gloo on CPU — and each rank trains on its slice of every global batch. Gradients
are summed across ranks once per optimizer step, after the last micro-step of the accumulation,
so accumulation costs no communication (what DDP's ``no_sync()`` achieves). The LoKr modules
live outside the UNet's module tree and run inside gradient-checkpointed blocks, which is why an
explicit all-reduce is used instead of wrapping a module in ``DistributedDataParallel``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hakubooru.errors import HakubooruError

DEFAULT_TIMEOUT_S = 1800  # torch's own default for gloo and nccl: 30 min


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints progress."""
        return self.rank == 0


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join torchrun's process group if launched by it; otherwise a single process.
    ``timeout_s``: how long a collective waits for the slowest rank before the run fails
    (``train.ddp_timeout``; rank 0's start-up work before the first collective must fit)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op for one process)."""
    if d.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params, d: Dist, bucket_numel: int = 1 << 25) -> None:
    """Average the gradients of ``params`` over all ranks: a few flat buffers of at most
    ``bucket_numel`` elements each, so a large LoKr never needs a second full copy."""
    if d.world_size == 1:
        return
    params = list(params)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= d.world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def on_main(compute, d: Dist):
    """``compute()`` run on rank 0 alone and its (picklable) result given to every rank; a
    HakubooruError there is raised on every rank, so none waits for a result that never comes."""
    if d.world_size == 1:
        return compute()
    box = [None]
    if d.is_main:
        try:
            box[0] = (True, compute())
        except HakubooruError as e:
            box[0] = (False, str(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise HakubooruError(value)
    return value


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op for one process)."""
    if d.world_size > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    """Leave the process group."""
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
