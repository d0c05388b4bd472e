"""Multi-process training with torch.distributed, for `torchrun --nproc_per_node N train_draem.py ...`.

Two ways to use the processes (train_draem.py --parallel):
- ddp (default): all processes train one category together; each draws its own samples and
  DistributedDataParallel averages the gradients (effective batch N x --bs).
- categories: each process trains whole categories (and seeds) on its own, exactly as a single process
  would (the paper's batch, its own random streams); the group only coordinates (`solo`, `assign_jobs`).
A plain `python train_draem.py` never creates a process group: every helper below then does what a
single process needs (rank 0 of 1, no sampler, no communication), so the paper's default run is untouched.
Under torchrun process i of a machine trains on cuda:i (its LOCAL_RANK), or on the CPU with gloo.
"""
import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from util.errors import DraemInputError
from util.runtime import select_device, torchrun_device

# Category-parallel processes wait for each other only at the end, up to a category's training time apart
# (hours); the group's default timeout (minutes) would end the run there.
COORDINATION_TIMEOUT = datetime.timedelta(days=7)
_solo = False  # inside `solo()`: this process trains on its own although a process group exists


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@contextlib.contextmanager
def process_group(device_name: str = "auto", gpu_id: int = 0,
                  coordination_only: bool = False) -> Iterator[torch.device]:
    """Yield this process's device; under torchrun, join the process group for the duration.

    Under torchrun the device is cuda:LOCAL_RANK (an explicit index is refused when the machine runs several
    processes, see runtime.torchrun_device). The backend follows the device for DDP: nccl on CUDA, gloo on the
    CPU. `coordination_only` (category-parallel): gloo whatever the device, with a timeout of days, since the
    processes only exchange small objects when all have finished. A process group that the caller already set
    up (training called from a larger program) is used as it is.
    """
    if not launched_by_torchrun():
        yield select_device(device_name, gpu_id)
        return
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    device = torchrun_device(device_name, gpu_id, int(os.environ["LOCAL_RANK"]), local_world_size)
    if dist.is_initialized():
        yield device
        return
    if coordination_only:
        dist.init_process_group("gloo", timeout=COORDINATION_TIMEOUT)
    else:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Within: the helpers below act as in a single process (rank 0 of 1, no sampler, no communication)
    although a process group exists, so a category-parallel process trains a category exactly as a lone
    process would."""
    global _solo
    previous, _solo = _solo, True
    try:
        yield
    finally:
        _solo = previous


def _grouped() -> bool:
    return dist.is_initialized() and not _solo


def rank() -> int:
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    return dist.get_world_size() if _grouped() else 1


def is_main() -> bool:
    """True in the process that writes checkpoints, logs and images (rank 0; the only process without
    torchrun; every process inside `solo`)."""
    return rank() == 0


def process_index() -> tuple[int, int]:
    """(index, count) of this process among those torchrun started, `solo` or not; (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_jobs(costs: Sequence[float], processes: int) -> list[int]:
    """The process each job goes to, balancing the summed cost per process: longest job first, each to the
    process with the least cost so far (ties: the lower index). Every process computes the same answer."""
    loads = [0.0] * processes
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owner = min(range(processes), key=lambda p: loads[p])
        owners[job] = owner
        loads[owner] += costs[job]
    return owners


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The module to call in the training loop: `model` itself in a single process, else DDP around it.

    `model` stays the unwrapped module (DDP keeps it as `.module`): save it, read its `sspcab_io`, evaluate
    it.
    SyncBatchNorm replaces the BatchNorm layers in place and shares their parameters and buffers, so the
    checkpoint keys do not change.
    """
    if not _grouped():
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
    if not _grouped():
        return None
    return DistributedSampler(dataset, shuffle=False)


def average(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` (on this rank's device) over all ranks; `values` itself in a single
    process."""
    if not _grouped():
        return values
    values = values.detach().clone()  # all_reduce works in place
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """[object of rank 0, object of rank 1, ...]; every rank must call it. `[obj]` in a single process."""
    if not _grouped():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if _grouped():
        dist.barrier()
