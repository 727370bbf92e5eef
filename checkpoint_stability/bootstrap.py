"""Percentile bootstrap intervals over examples, and the paired one for a difference of two scores.

Every resample draws ``n`` examples with replacement; both series of a paired difference are read at
the *same* draws, so what the interval measures is how ``a`` and ``b`` differ on the same examples,
not how two unrelated samples of examples differ. The draws are the rows of one index matrix,
``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``, so a seed fixes the interval on
every machine and in every process. The matrix is drawn block by block of rows (a generator's stream
does not care how its draws are cut), which keeps memory bounded at 20,000 examples without changing
a single index. The interval is the percentile one: the ``(1 - confidence) / 2`` and
``(1 + confidence) / 2`` quantiles (numpy's default linear interpolation) of the resampled means.

torchmetrics' ``BootStrapper`` is not used: it keeps one copy of a ``Metric`` per resample and
resamples each ``update()`` batch on its own (Poisson or multinomial), so two series cannot share one
fixed index matrix and a paired difference over the same examples cannot be expressed; here the
per-example scores are already in hand and one seeded matrix is all that is needed.

>>> interval = paired_difference([1, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0], resamples=200)
>>> round(interval.estimate, 4), interval.low <= interval.estimate <= interval.high
(0.5, True)
>>> bootstrap_interval([1, 0, 1, 1], seed=3) == bootstrap_interval([1, 0, 1, 1], seed=3)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from checkpoint_stability.validation import as_list, is_real, require_int

_BLOCK_ELEMENTS = 1 << 22
"""At most this many indices (32 MiB of int64) are drawn and gathered at once."""


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval around a mean (or a difference of two means) over examples."""

    estimate: float
    """The plain mean over the examples given (for a paired difference: ``mean(a) - mean(b)``)."""
    low: float
    """The ``(1 - confidence) / 2`` quantile of the resampled means."""
    high: float
    """The ``(1 + confidence) / 2`` quantile of the resampled means."""
    resamples: int
    """How many resamples the quantiles were taken over."""
    seed: int
    """The seed of ``numpy.random.default_rng`` that drew the resamples."""
    confidence: float
    """The interval's nominal coverage, in (0, 1)."""

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside ``[low, high]``: for a paired difference, a significant one.

        >>> Interval(0.1, 0.02, 0.2, 1000, 0, 0.95).excludes_zero
        True
        >>> Interval(0.1, 0.0, 0.2, 1000, 0, 0.95).excludes_zero
        False
        """
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (floats and ints only).

        >>> Interval(0.5, 0.25, 0.75, 1000, 0, 0.95).to_json()
        {'estimate': 0.5, 'low': 0.25, 'high': 0.75, 'resamples': 1000, 'seed': 0, 'confidence': 0.95}
        """
        return asdict(self)


def bootstrap_interval(
    correct: Sequence[float], *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Interval:
    """A percentile bootstrap interval for the mean of per-example scores ``correct``.

    >>> interval = bootstrap_interval([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], resamples=500)
    >>> interval.estimate, interval.low < interval.estimate < interval.high
    (0.625, True)

    Raises:
        ValueError: no scores; a score that is not a finite real number (bools are refused);
            ``resamples`` < 1; ``seed`` not an integer >= 0; ``confidence`` not in (0, 1).
    """
    values = _scores(correct, "correct")
    return _interval(values, float(values.mean()), resamples=resamples, seed=seed, confidence=confidence)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """A paired percentile bootstrap interval for ``mean(a) - mean(b)`` over the same examples.

    ``a[i]`` and ``b[i]`` are two variants' scores on example ``i``; each resample reads both at the
    same drawn examples.

    >>> paired_difference([1, 0, 1, 1], [1, 0, 1, 1], resamples=100).to_json()["high"]
    0.0

    Raises:
        ValueError: as :func:`bootstrap_interval`, and ``a`` and ``b`` of different lengths.
    """
    first = _scores(a, "a")
    second = _scores(b, "b")
    if len(first) != len(second):
        raise ValueError(
            f"paired_difference needs scores of the same examples: a has {len(first)}, b has {len(second)}"
        )
    # The mean of a resample of (a - b) is the difference of the two resampled means at the same draws.
    estimate = float(first.mean()) - float(second.mean())
    return _interval(first - second, estimate, resamples=resamples, seed=seed, confidence=confidence)


def _scores(values: Any, name: str) -> np.ndarray:
    items = as_list(values, name)
    if not items:
        raise ValueError(f"{name} must hold at least one per-example score, got none")
    for index, value in enumerate(items):
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(
                f"{name}[{index}] is {value!r} ({type(value).__name__}); expected a finite real number "
                "(bool is not allowed)"
            )
    return np.asarray(items, dtype=np.float64)


def stratified_interval(
    groups: Sequence[Sequence[float]], *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Interval:
    """A percentile bootstrap interval for the mean over tasks of each task's mean score.

    Each group (one task's per-example scores) is resampled within itself, so every resample keeps
    each task's size and weight, as the mean-over-tasks score does. The draws come from one
    ``default_rng(seed)``, group after group in the order given (group ``g``'s index matrix is
    ``integers(0, n_g, size=(resamples, n_g))``); one group gives exactly :func:`bootstrap_interval`.

    >>> stratified_interval([[1, 0, 1, 1]], seed=3) == bootstrap_interval([1, 0, 1, 1], seed=3)
    True
    >>> stratified_interval([[1, 1, 1, 1], [0, 0]], resamples=50).to_json()["low"]  # (1 + 0) / 2 always
    0.5

    Raises:
        ValueError: no groups, or as :func:`bootstrap_interval` for any group.
    """
    values = _groups(groups, "groups")
    estimate = math.fsum(float(group.mean()) for group in values) / len(values)
    return _interval(values, estimate, resamples=resamples, seed=seed, confidence=confidence)


def paired_stratified_difference(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """A paired interval for (mean over tasks of ``a``) − (mean over tasks of ``b``): task ``g``'s
    examples are resampled within the task, and both sides read the same draws.

    >>> paired_stratified_difference([[1, 0, 1]], [[0, 0, 1]], seed=1) == paired_difference(
    ...     [1, 0, 1], [0, 0, 1], seed=1)
    True

    Raises:
        ValueError: as :func:`stratified_interval`; a different number of groups, or a group of
            ``a`` and ``b`` of different lengths.
    """
    first, second = _groups(a, "a"), _groups(b, "b")
    if len(first) != len(second):
        raise ValueError(f"a has {len(first)} groups and b has {len(second)}; each task needs both sides")
    for index, (left, right) in enumerate(zip(first, second, strict=True)):
        if len(left) != len(right):
            raise ValueError(
                f"group {index}: a has {len(left)} scores and b has {len(right)}; a paired difference "
                "needs both variants' scores of the same examples"
            )
    estimate = math.fsum(float(x.mean()) - float(y.mean()) for x, y in zip(first, second, strict=True))
    differences = [x - y for x, y in zip(first, second, strict=True)]
    return _interval(
        differences, estimate / len(first), resamples=resamples, seed=seed, confidence=confidence
    )


def _groups(groups: Any, name: str) -> list[np.ndarray]:
    items = as_list(groups, name)
    if not items:
        raise ValueError(f"{name} must hold at least one group of per-example scores, got none")
    return [_scores(group, f"{name}[{index}]") for index, group in enumerate(items)]


def _interval(
    groups: np.ndarray | list[np.ndarray], estimate: float, *, resamples: Any, seed: Any, confidence: Any
) -> Interval:
    """The percentile interval of the resampled mean over ``groups`` of each group's mean (one array:
    one group)."""
    resamples = require_int("resamples", resamples, 1)
    seed = require_int("seed", seed, 0)
    if not is_real(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a real number strictly between 0 and 1, got {confidence!r}")
    confidence = float(confidence)
    arrays = [groups] if isinstance(groups, np.ndarray) else list(groups)
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples, dtype=np.float64)
    for values in arrays:
        n = len(values)
        rows = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            indices = rng.integers(0, n, size=(stop - start, n))
            means[start:stop] += values[indices].mean(axis=1)
    if len(arrays) > 1:
        means /= len(arrays)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(
        estimate=estimate,
        low=float(low),
        high=float(high),
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )
