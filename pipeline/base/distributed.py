"""Several processes under ``torchrun``: who this process is, and agreeing on outcomes.

kdpipe uses ``torch.distributed`` as it is (gloo on CPU, NCCL on CUDA) and adds
one rule: a step with side effects (preparing an output, finishing a cache,
writing a run's files) runs on rank 0 alone, and its outcome, a result or a
:class:`KdpipeError`, is broadcast, so that every rank returns or fails with the
same message instead of waiting at a barrier for a rank that has already died.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is
a no-op and the process is rank 0 of 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from kdpipe.base.errors import KdpipeError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shares(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: every ``size``-th, starting at ``rank``."""
        return items[self.rank :: self.size]

    def on_main(self, step: Callable[..., T], *args: Any) -> T:
        """Run ``step(*args)`` on rank 0; every rank returns its result or raises its
        KdpipeError."""
        outcome: list = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", step(*args))
            except KdpipeError as exc:
                outcome[0] = ("error", exc)
                if not self.active:
                    raise
        if not self.active:
            return outcome[0][1]
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` over the ranks (float64 on the CPU, so gloo can carry it)."""
        if not self.active:
            return values
        total = values.detach().double().cpu()
        dist.all_reduce(total)
        return total

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), which each
        rank's last forward pass changed with its own rows."""
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


SINGLE = World()


def current_world() -> World:
    """The world ``torchrun`` started this process in; joins its process group once."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise UsageError(
                    f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                    "start at most one process per GPU"
                )
            torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
        # CPU tensors (objects, metric sums, a --device cpu run) go over gloo either way
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank)
