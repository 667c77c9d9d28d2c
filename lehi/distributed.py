"""Data-parallel training under torchrun: process group, batch shards, cross-rank means.

``torchrun --nproc_per_node=N run.py …`` starts N processes; each builds the same data in
the same order (same seed) and trains on its contiguous 1/N slice of every global batch, so
an N-rank run sees exactly the batches of a 1-process run with the same global batch size.
DistributedDataParallel averages the gradients; the curvature-aware optimizers average their
auxiliary gradients the same way (``configure_data_parallel``), with N in the N-scaling the
global number of loss terms.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("lehi")

__all__ = ["Distributed", "from_environment"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process (cuda:<local rank>); CPU stays CPU."""
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's contiguous slice of a global batch."""
        n = x.shape[0]
        if n % self.world_size:
            raise ValueError(
                f"dataset.batch_size={n} is not divisible by the {self.world_size} ranks"
            )
        size = n // self.world_size
        lo = self.rank * size
        return x[lo : lo + size], y[lo : lo + size]

    def mean_(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` in place across ranks (the auxiliary gradients)."""
        for t in tensors:
            dist.all_reduce(t)
            t.div_(self.world_size)

    def sum_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the job together: a rank that tears gloo down while its peer still writes
        the run's files aborts the peer's connection threads ("terminate called without an
        active exception"), so every rank waits for the others first. A peer that has died
        is not waited for past the timeout."""
        if not dist.is_initialized():
            return
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
            else:
                dist.barrier()
        except RuntimeError as exc:
            log.warning("data parallel: not every rank reached the end (%s)", exc)
        dist.destroy_process_group()


def from_environment(device: torch.device) -> Distributed | None:
    """Join the torchrun job described by the environment, or None for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)
