"""Splitting a task's examples across ranks and gathering the results back in the original order.

Every rank gets the same number of items (the last shares are padded by repeating an example, whose
results are then dropped), so every rank runs the same number of forward passes: with a sharded model
(FSDP2), a rank that stops early leaves the others waiting in a collective forever.

Collectives go through a :class:`~checkpoint_stability.runtime.Runtime`. A task's ``evaluate(model)``
is given none, so by default it is :func:`~checkpoint_stability.runtime.default_runtime`: the
``torch.distributed`` default group when one is up with more than one rank, else the single process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from checkpoint_stability.runtime import Runtime, default_runtime


def rank_and_world(runtime: Runtime | None = None) -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) without an initialised process group."""
    runtime = default_runtime() if runtime is None else runtime
    return runtime.rank, runtime.world_size


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


def gather_in_order(local: Sequence, shard: Shard, runtime: Runtime | None = None) -> list:
    """Every rank's real results, concatenated in rank order: the task's original example order."""
    own = list(local[: shard.real])
    if len(local) != shard.size:
        raise ValueError(f"expected {shard.size} results for this rank's shard, got {len(local)}")
    runtime = default_runtime() if runtime is None else runtime
    if runtime.world_size == 1:
        return own
    return [item for part in runtime.all_gather_object(own) for item in part]


def max_over_ranks(value: int, runtime: Runtime | None = None) -> int:
    """The largest ``value`` over all ranks, on every rank (e.g. how many batches the busiest rank has)."""
    runtime = default_runtime() if runtime is None else runtime
    if runtime.world_size == 1:
        return value
    return max(runtime.all_gather_object(int(value)))


def any_rank_true(flag: bool, runtime: Runtime | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. "some sequence is still generating")."""
    runtime = default_runtime() if runtime is None else runtime
    return runtime.any_rank(bool(flag))
