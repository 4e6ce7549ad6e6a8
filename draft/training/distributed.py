"""Data-parallel drafter training under `torchrun` (DDP over gloo on CPU, NCCL on CUDA).

Every rank draws the same global batch (one generator, seeded alike, so the sequences and
anchors match a single process's) and keeps its share of the sequences, so each rank reads only
its part of the feature cache per step; DDP averages the gradients. Rank 0 alone logs,
validates and saves, in the single-process format. Without torchrun's environment (WORLD_SIZE
unset or 1) nothing here does anything.
"""

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True, slots=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (contiguous, so ranks split it evenly)."""
        n = len(items)
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        return items[lo:hi]

    def device(self, requested: str | None) -> torch.device:
        if requested is not None:
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, step: nn.Module) -> nn.Module:
        """DDP around `step` under torchrun; `step` itself in one process."""
        if not self.enabled:
            return step
        ids = [self.local_rank] if next(step.parameters()).is_cuda else None
        return DistributedDataParallel(step, device_ids=ids)

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over ranks (the same keys on every rank, in order)."""
        if not self.enabled:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values)}

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision (a wall-clock stop), the same on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())


def start() -> DataParallel:
    """Join torchrun's process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return DataParallel(rank, world, local)


def stop(dp: DataParallel) -> None:
    """Leave the group once every rank is done and DDP's reducer (which holds the group) is gone:
    destroying the group under a live reducer aborts the process at exit."""
    if dp.enabled and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
