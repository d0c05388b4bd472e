"""Multi-process training with torch.distributed (DDP), for `torchrun --nproc_per_node N train_draem.py ...`.

A plain `python train_draem.py` never creates a process group: every helper below then does what a
single process needs (rank 0 of 1, no sampler, no communication), so the paper's default run is untouched.
Under torchrun each process trains on its own device (cuda:LOCAL_RANK, or the CPU with gloo) and
draws its own samples; gradients are averaged by DistributedDataParallel.
"""
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from util.errors import DraemInputError
from util.runtime import select_device


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@contextlib.contextmanager
def process_group(device_name: str = "auto", gpu_id: int = 0) -> Iterator[torch.device]:
    """Yield this process's device; under torchrun, join the process group for the duration.

    The backend follows the device: nccl on CUDA (device cuda:LOCAL_RANK, so --gpu_id is not used), gloo on
    the CPU.
    A process group that the caller already set up (training called from a larger program) is used as it is.
    """
    if not launched_by_torchrun():
        yield select_device(device_name, gpu_id)
        return
    device = select_device(device_name, int(os.environ["LOCAL_RANK"]))
    if dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that writes checkpoints, logs and images (rank 0; the only process without
    torchrun)."""
    return rank() == 0


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The module to call in the training loop: `model` itself in a single process, else DDP around it.

    `model` stays the unwrapped module (DDP keeps it as `.module`): save it, read its `sspcab_io`, evaluate
    it.
    SyncBatchNorm replaces the BatchNorm layers in place and shares their parameters and buffers, so the
    checkpoint keys do not change.
    """
    if not dist.is_initialized():
        if sync_bn:
            print("note: --sync_bn has no effect in a single process (there are no other batches to sync "
                  "with)")
        return model
    if sync_bn:
        if device.type != "cuda":
            raise DraemInputError("--sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU "
                                  "implementation (leave it out on the CPU)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_sampler(dataset: Dataset) -> DistributedSampler | None:
    """None in a single process; else a sampler giving this rank ceil(len / world_size) of each epoch's items.

    The training dataset ignores the index (every item is a fresh random draw from the rank's own seeded
    stream), so the sampler only fixes how many items each rank draws: together, one epoch as in a single
    process.
    """
    if not dist.is_initialized():
        return None
    return DistributedSampler(dataset, shuffle=False)


def average(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` (on this rank's device) over all ranks; `values` itself in a single
    process."""
    if not dist.is_initialized():
        return values
    values = values.detach().clone()  # all_reduce works in place
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """[object of rank 0, object of rank 1, ...]; every rank must call it. `[obj]` in a single process."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()
