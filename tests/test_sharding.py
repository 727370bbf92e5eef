"""tasks/sharding.py reaches the other ranks only through a Runtime (default: default_runtime())."""

from __future__ import annotations

from checkpoint_stability.runtime import Runtime
from checkpoint_stability.tasks.sharding import (
    any_rank_true,
    gather_in_order,
    max_over_ranks,
    rank_and_world,
    shard_examples,
)


class TwoRanks(Runtime):
    """Rank 0 of 2; the other rank's objects are given, and every collective is recorded."""

    world_size = 2

    def __init__(self, other):
        self.other = other
        self.calls: list[str] = []

    def any_rank(self, flag: bool) -> bool:
        self.calls.append("any_rank")
        return flag or bool(self.other)

    def all_gather_object(self, obj) -> list:
        self.calls.append("all_gather_object")
        return [obj, self.other]


def test_without_a_process_group_the_default_runtime_is_one_process():
    assert rank_and_world() == (0, 1)
    shard = shard_examples(3)
    assert gather_in_order(["a", "b", "c"], shard) == ["a", "b", "c"]
    assert max_over_ranks(4) == 4
    assert any_rank_true(False) is False and any_rank_true(True) is True


def test_collectives_go_through_the_given_runtime():
    runtime = TwoRanks(other=["c", "d"])
    shard = shard_examples(5, *rank_and_world(runtime))
    assert shard.indices == [0, 1, 2] and shard.real == 3
    assert gather_in_order(["a", "b", "x"], shard, runtime) == ["a", "b", "x", "c", "d"]
    assert max_over_ranks(3, TwoRanks(other=7)) == 7
    flags = TwoRanks(other=True)
    assert any_rank_true(False, flags) is True
    assert runtime.calls == ["all_gather_object"] and flags.calls == ["any_rank"]
