"""Splitting a task's examples across ranks and gathering the results back in the original order.

Every rank gets the same number of items (the last shares are padded by repeating an example, whose
results are then dropped), so every rank runs the same number of forward passes: with a sharded model
(FSDP2), a rank that stops early leaves the others waiting in a collective forever.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Shard:
    """The examples one rank evaluates: ``indices`` into the task's examples, padded to ``size``.

    ``indices[:real]`` are this rank's own examples; the rest repeat one of them only so that every
    rank runs the same number of forward passes.
    """

    indices: list[int]
    real: int

    @property
    def size(self) -> int:
        return len(self.indices)


def shard_examples(count: int, rank: int | None = None, world: int | None = None) -> Shard:
    """Contiguous shares of ``range(count)``, all of length ``ceil(count / world)``."""
    if count < 1:
        raise ValueError(f"cannot shard {count} examples; a task needs at least one")
    if rank is None or world is None:
        rank, world = rank_and_world()
    per_rank = math.ceil(count / world)
    own = list(range(rank * per_rank, min(count, (rank + 1) * per_rank)))
    filler = own[-1] if own else count - 1
    return Shard(own + [filler] * (per_rank - len(own)), len(own))


def gather_in_order(local: Sequence, shard: Shard) -> list:
    """Every rank's real results, concatenated in rank order: the task's original example order."""
    own = list(local[: shard.real])
    if len(local) != shard.size:
        raise ValueError(f"expected {shard.size} results for this rank's shard, got {len(local)}")
    _, world = rank_and_world()
    if world == 1:
        return own
    everyone: list = [None] * world
    dist.all_gather_object(everyone, own)
    return [item for part in everyone for item in part]


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks, on every rank (e.g. how many batches the busiest rank has)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    everyone: list = [None] * world
    dist.all_gather_object(everyone, int(value))
    return max(everyone)


def any_rank_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. "some sequence is still generating")."""
    return bool(max_over_ranks(1 if flag else 0))
