import doctest
import json
import math
import random

import numpy as np
import pytest

from checkpoint_stability import bootstrap
from checkpoint_stability.bootstrap import Interval, bootstrap_interval, paired_difference


def oracle_quantile(values, p):
    """Linear interpolation between order statistics at rank (R - 1) * p (numpy's default method)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (rank - below) * (ordered[above] - ordered[below])


def oracle_paired(a, b, resamples, seed, confidence):
    """The same index matrix, drawn with the same rng call, then a plain Python loop over its rows."""
    n = len(a)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()
    differences = []
    for row in indices:
        mean_a = math.fsum(a[j] for j in row) / n
        mean_b = math.fsum(b[j] for j in row) / n
        differences.append(mean_a - mean_b)
    estimate = math.fsum(a) / n - math.fsum(b) / n
    low = oracle_quantile(differences, (1 - confidence) / 2)
    high = oracle_quantile(differences, (1 + confidence) / 2)
    return estimate, low, high


def scores(n, p, seed):
    rng = random.Random(seed)
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


def close(x, y):
    return math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12)


def test_doctests():
    result = doctest.testmod(bootstrap)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("n", "resamples", "seed", "confidence"),
    [(40, 300, 0, 0.95), (7, 50, 11, 0.9), (123, 257, 2024, 0.8), (2, 1, 5, 0.5)],
)
def test_paired_difference_equals_a_loop_over_the_same_index_matrix(n, resamples, seed, confidence):
    a = scores(n, 0.6, seed)
    b = [0.5 * x + 0.25 for x in scores(n, 0.5, seed + 1)]  # not only 0/1 scores
    estimate, low, high = oracle_paired(a, b, resamples, seed, confidence)
    interval = paired_difference(a, b, resamples=resamples, seed=seed, confidence=confidence)
    assert close(interval.estimate, estimate)
    assert close(interval.low, low)
    assert close(interval.high, high)
    assert (interval.resamples, interval.seed, interval.confidence) == (resamples, seed, confidence)


@pytest.mark.parametrize(("n", "resamples", "seed"), [(60, 400, 0), (9, 33, 3)])
def test_bootstrap_interval_equals_a_loop_over_the_same_index_matrix(n, resamples, seed):
    a = scores(n, 0.3, seed)
    zeros = [0.0] * n
    estimate, low, high = oracle_paired(a, zeros, resamples, seed, 0.95)
    interval = bootstrap_interval(a, resamples=resamples, seed=seed)
    assert close(interval.estimate, estimate)
    assert close(interval.low, low)
    assert close(interval.high, high)


@pytest.mark.parametrize("block_elements", [1, 50, 200])
def test_drawing_the_matrix_block_by_block_changes_no_index(monkeypatch, block_elements):
    # The oracle draws the whole (resamples, n) matrix in one call; the module draws it in blocks of rows.
    a, b = scores(37, 0.7, 1), scores(37, 0.4, 2)
    monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", block_elements)
    interval = paired_difference(a, b, resamples=101, seed=9)
    estimate, low, high = oracle_paired(a, b, 101, 9, 0.95)
    assert close(interval.low, low)
    assert close(interval.high, high)
    assert close(interval.estimate, estimate)


def test_deterministic_across_calls_and_a_different_seed_gives_different_draws():
    a, b = scores(200, 0.6, 4), scores(200, 0.5, 5)
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)
    assert bootstrap_interval(a, seed=3) == bootstrap_interval(a, seed=3)
    assert paired_difference(a, b, seed=3) != paired_difference(a, b, seed=4)


def test_the_interval_contains_the_estimate():
    for seed in range(5):
        a, b = scores(300, 0.55, seed), scores(300, 0.5, seed + 100)
        single = bootstrap_interval(a, seed=seed)
        assert single.low <= single.estimate <= single.high
        paired = paired_difference(a, b, seed=seed)
        assert paired.low <= paired.estimate <= paired.high


def test_fewer_examples_give_a_wider_interval():
    many = [1.0, 0.0, 1.0] * 400  # mean 2/3, 1,200 examples
    few = [1.0, 0.0, 1.0] * 10  # the same mean, 30 examples
    wide = bootstrap_interval(few)
    narrow = bootstrap_interval(many)
    assert wide.estimate == pytest.approx(narrow.estimate)
    assert wide.high - wide.low > 3 * (narrow.high - narrow.low)


def test_a_higher_confidence_gives_a_wider_interval():
    a = scores(100, 0.5, 0)
    assert bootstrap_interval(a, confidence=0.99).high - bootstrap_interval(a, confidence=0.99).low > (
        bootstrap_interval(a, confidence=0.5).high - bootstrap_interval(a, confidence=0.5).low
    )


def test_pairing_makes_a_consistent_small_gain_significant():
    # b is right wherever a is, plus 20 more of 400: unpaired the two scores' intervals overlap, paired
    # every resample's difference is >= 0 and the interval excludes zero.
    a = scores(400, 0.5, 8)
    b = a[:]
    flipped = [i for i, x in enumerate(b) if x == 0.0][:20]
    for i in flipped:
        b[i] = 1.0
    gain = paired_difference(b, a)
    assert gain.estimate == pytest.approx(20 / 400)
    assert gain.low > 0 and gain.excludes_zero
    assert bootstrap_interval(a).high > bootstrap_interval(b).low  # overlapping, unpaired
    same = paired_difference(a, a)
    assert (same.low, same.high, same.estimate) == (0.0, 0.0, 0.0)
    assert not same.excludes_zero


def test_excludes_zero_and_to_json():
    assert Interval(-0.2, -0.3, -0.01, 10, 0, 0.9).excludes_zero
    assert not Interval(0.0, -0.1, 0.1, 10, 0, 0.9).excludes_zero
    assert not Interval(0.1, 0.0, 0.2, 10, 0, 0.9).excludes_zero  # touching zero is not excluding it
    interval = paired_difference([1, 0, 1, 1], [0, 0, 1, 0], resamples=20, seed=1)
    data = json.loads(json.dumps(interval.to_json()))
    assert data == {
        "estimate": interval.estimate,
        "low": interval.low,
        "high": interval.high,
        "resamples": 20,
        "seed": 1,
        "confidence": 0.95,
    }
    assert Interval(**data) == interval


def test_numpy_inputs_are_accepted():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    assert bootstrap_interval(a, resamples=np.int64(30)) == bootstrap_interval(a.tolist(), resamples=30)


def test_errors():
    with pytest.raises(ValueError, match="correct must hold at least one per-example score, got none"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="a must hold at least one"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="a has 3, b has 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"correct\[1\] is nan"):
        bootstrap_interval([1.0, math.nan])
    with pytest.raises(ValueError, match=r"b\[0\] is True"):
        paired_difference([1.0], [True])
    with pytest.raises(ValueError, match="correct must be a sequence"):
        bootstrap_interval("1010")
    for confidence in (0, 1, 1.5, -0.5, math.nan, True, "0.95"):
        with pytest.raises(ValueError, match="confidence must be a real number strictly between 0 and 1"):
            bootstrap_interval([1.0, 0.0], confidence=confidence)
    for resamples in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="resamples must be an integer >= 1"):
            paired_difference([1.0], [0.0], resamples=resamples)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        bootstrap_interval([1.0], seed=-1)
