"""What differs between single-process and multi-process runs, as the monitor sees it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


class Runtime:
    """A single process: rank 0 of 1; every collective is the identity.

    Framework adapters may subclass it (e.g. to use the trainer's own strategy for collectives).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (used to agree on errors)."""
        return flag

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every rank's tensors in place with rank 0's."""

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]


class TorchDistributedRuntime(Runtime):
    """A process in an initialised ``torch.distributed`` default group (gloo or NCCL)."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributedRuntime needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def broadcast_object(self, obj):
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            dist.broadcast(tensor, src=0, group=self.group)

    def all_gather_object(self, obj) -> list:
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def default_runtime() -> Runtime:
    """The torch.distributed runtime when a process group is up with more than one rank, else local."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedRuntime()
    return Runtime()
