import doctest
import hashlib
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from checkpoint_stability import holdout
from checkpoint_stability.holdout import HoldoutSplit, half_score, is_confirmation, split

MIXED_IDS = ["q1", "q2", 3, 4.5, True, None, [1, "a"], {"b": 2, "a": 1}, "naïve/ü", *range(100, 140)]


def oracle_confirmation(task, example_id, fraction):
    """DESIGN.md's rule, written out again with hashlib."""
    text = example_id if isinstance(example_id, str) else json.dumps(example_id, sort_keys=True)
    value = int(hashlib.sha256(f"{task}/{text}".encode()).hexdigest()[:8], 16)
    return value / 2**32 < fraction


def test_doctests():
    result = doctest.testmod(holdout, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_the_hash_rule_recomputed_with_hashlib(fraction):
    for task in ("qa", "arc/easy", ""):
        for example_id in MIXED_IDS:
            assert is_confirmation(task, example_id, fraction) == oracle_confirmation(
                task, example_id, fraction
            )
        halves = split(task, MIXED_IDS, fraction)
        expected_confirmation = [
            i for i, example_id in enumerate(MIXED_IDS) if oracle_confirmation(task, example_id, fraction)
        ]
        assert halves.confirmation == expected_confirmation
        assert halves.selection == [i for i in range(len(MIXED_IDS)) if i not in expected_confirmation]


def test_non_string_ids_are_hashed_as_their_json_text():
    # The text of a dict does not depend on the order its keys were written in.
    assert is_confirmation("t", {"a": 1, "b": 2}, 0.5) == is_confirmation("t", {"b": 2, "a": 1}, 0.5)
    # An id read back from JSON (a tuple came back as a list) keeps its half.
    for fraction in (0.2, 0.5, 0.8):
        for example_id in [(1, "a"), ("x", 2, 3), (0,)]:
            assert is_confirmation("t", example_id, fraction) == is_confirmation(
                "t", json.loads(json.dumps(example_id)), fraction
            )
    # The string "7" and the integer 7 have the same text, so the same half; True is "true", not "1".
    assert holdout.example_text(7) == holdout.example_text("7") == "7"
    assert holdout.example_text(True) == "true"


def test_the_same_ids_land_in_the_same_halves_in_another_process_with_another_hash_seed():
    ids = [f"ex{i}" for i in range(300)] + list(range(300))
    here = split("task/a", ids, 0.37)
    code = (
        "import json, sys\n"
        "from checkpoint_stability.holdout import split\n"
        "ids = json.loads(sys.stdin.read())\n"
        "h = split('task/a', ids, 0.37)\n"
        "print(json.dumps([h.selection, h.confirmation]))\n"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(ids),
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        selection, confirmation = json.loads(done.stdout)
        assert (selection, confirmation) == (here.selection, here.confirmation)


def test_the_halves_do_not_depend_on_the_order_of_the_examples():
    ids = [f"item-{i}" for i in range(500)]
    halves = split("qa", ids, 0.25)
    confirmation_ids = {ids[i] for i in halves.confirmation}
    rng = random.Random(7)
    for _ in range(5):
        shuffled = ids[:]
        rng.shuffle(shuffled)
        again = split("qa", shuffled, 0.25)
        assert {shuffled[i] for i in again.confirmation} == confirmation_ids
        assert sorted(again.selection + again.confirmation) == list(range(len(ids)))
        # Each half keeps the order given.
        assert again.confirmation == sorted(again.confirmation)
        assert again.selection == sorted(again.selection)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_the_share_of_confirmation_examples_is_within_three_sigma_of_the_fraction(fraction):
    n = 10_000
    halves = split("share", range(n), fraction)
    share = len(halves.confirmation) / n
    sigma = math.sqrt(fraction * (1 - fraction) / n)
    assert abs(share - fraction) <= 3 * sigma, (share, fraction, sigma)
    assert len(halves.selection) + len(halves.confirmation) == n


def test_different_tasks_split_the_same_ids_differently():
    a = split("task-a", range(200), 0.5)
    b = split("task-b", range(200), 0.5)
    assert a.confirmation != b.confirmation


def test_half_score_is_the_mean_over_the_indices():
    correct = [1.0, 0.0, 0.5, 1.0, 0.25]
    assert half_score(correct, [0, 2, 4]) == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert half_score(correct, [1]) == 0.0
    assert half_score(np.array(correct), np.array([3, 4])) == pytest.approx(0.625)
    halves = HoldoutSplit(selection=[0, 1], confirmation=[2, 3, 4])
    assert half_score(correct, halves.confirmation) == pytest.approx(1.75 / 3)


def test_the_split_is_frozen():
    halves = split("qa", range(20), 0.5)
    with pytest.raises(AttributeError):
        halves.selection = []  # type: ignore[misc]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True, "0.5", None])
def test_a_fraction_outside_the_open_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match=r"holdout must be a real number strictly between 0 and 1, got"):
        split("qa", range(10), fraction)
    with pytest.raises(ValueError, match="holdout"):
        is_confirmation("qa", 1, fraction)


def test_a_half_with_fewer_than_two_examples_is_refused_naming_the_task_and_both_counts():
    counts = r"task 'tiny': holdout=0.5 leaves \d+ selection and \d+ confirmation examples of 3"
    with pytest.raises(ValueError, match=counts):
        split("tiny", ["a", "b", "c"], 0.5)
    with pytest.raises(ValueError, match=r"leaves 0 selection and 0 confirmation examples of 0"):
        split("empty", [], 0.5)
    # 20 ids at holdout=0.01: almost surely none held out.
    with pytest.raises(ValueError, match=r"task 'rare'.* confirmation examples of 20"):
        split("rare", range(20), 0.01)


def test_bad_ids_and_tasks_are_refused():
    with pytest.raises(ValueError, match="is not a JSON value"):
        is_confirmation("qa", np.int64(3), 0.5)
    with pytest.raises(ValueError, match="is not a JSON value"):
        is_confirmation("qa", math.nan, 0.5)
    with pytest.raises(ValueError, match="is not a JSON value"):
        split("qa", [object(), "b"], 0.5)
    with pytest.raises(ValueError, match="task must be a task name"):
        is_confirmation(3, "a", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_ids must be a sequence"):
        split("qa", "abcdef", 0.5)


def test_half_score_errors():
    with pytest.raises(ValueError, match="at least one index"):
        half_score([1.0, 0.0], [])
    with pytest.raises(ValueError, match=r"index 2 is not an integer in \[0, 2\)"):
        half_score([1.0, 0.0], [2])
    with pytest.raises(ValueError, match=r"index -1 is not"):
        half_score([1.0, 0.0], [-1])
    with pytest.raises(ValueError, match=r"correct\[1\] is True"):
        half_score([1.0, True], [0, 1])
    with pytest.raises(ValueError, match=r"correct\[0\] is nan"):
        half_score([math.nan, 1.0], [0, 1])
