"""Instability metrics for downstream evaluation across pretraining checkpoints (arXiv 2510.04848).

Mean total variation (MTV) measures how much a task *score* moves between consecutive checkpoints; the
instability score (IS) measures how often the per-example *outputs* change between consecutive checkpoints.
Both expect checkpoints ordered by training step, oldest first.
"""

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from checkpoint_stability.validation import as_list, is_real

Similarity = Callable[[Any, Any], float]


def mean_total_variation(scores: Sequence[float]) -> float:
    """Mean absolute change of a score between consecutive checkpoints.

    ``MTV = 1/(m-1) * sum_t |s[t+1] - s[t]|`` for the scores ``s`` of ``m >= 2`` checkpoints. Lower is
    more stable; 0 means the score never moved.

    >>> round(mean_total_variation([0.2, 0.5, 0.4]), 12)  # (0.3 + 0.1) / 2
    0.2

    Raises:
        ValueError: fewer than two scores, or a score that is not a finite real number (bools are
            rejected: a True/False here is almost always a per-example correctness flag passed by mistake).
    """
    values = as_list(scores, "scores")
    if len(values) < 2:
        raise ValueError(f"mean_total_variation needs at least two checkpoints, got {len(values)}")
    for t, score in enumerate(values):
        if not is_real(score):
            raise ValueError(
                f"scores[{t}] is {score!r} ({type(score).__name__}); "
                "expected a real number (int or float, bool is not allowed)"
            )
        if not math.isfinite(score):
            raise ValueError(f"scores[{t}] is {score!r}; scores must be finite (no NaN or infinity)")
    # fsum: exactly rounded, so the result does not depend on how many checkpoints are summed.
    return math.fsum(abs(b - a) for a, b in itertools.pairwise(values)) / (len(values) - 1)


def instability_score(outputs: Sequence[Sequence[Any]], similarity: str | Similarity = "exact") -> float:
    """Average per-example rate of output change between consecutive checkpoints.

    ``outputs[t][i]`` is checkpoint ``t``'s output for example ``i`` (``m >= 2`` checkpoints, ``n >= 1``
    examples). ``IS = 1/n * sum_i 1/(m-1) * sum_t (1 - sim(outputs[t][i], outputs[t+1][i]))``, in [0, 1].

    ``similarity`` is ``"exact"`` (:func:`exact_match`), ``"char_f1"`` (:func:`char_f1`) or any callable
    ``(a, b) -> float`` returning a value in [0, 1].

    >>> instability_score([["A", "B"], ["A", "C"], ["A", "B"]])  # example 1 changes twice out of 2
    0.5

    Raises:
        ValueError: fewer than two checkpoints, zero examples, rows of different lengths, an unknown
            similarity, or a similarity callable returning NaN or a value outside [0, 1].
    """
    sim = resolve_similarity(similarity)
    rows = as_list(outputs, "outputs")
    if len(rows) < 2:
        raise ValueError(
            f"instability_score needs at least two checkpoints (rows of outputs), got {len(rows)}"
        )
    rows = [as_list(row, f"outputs[{t}]") for t, row in enumerate(rows)]
    n = len(rows[0])
    if n == 0:
        raise ValueError("outputs has zero examples (columns); instability_score needs at least one example")
    for t, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(
                f"outputs is ragged: row {t} has {len(row)} outputs, expected {n} (the length of row 0)"
            )
    m = len(rows)
    per_example = []
    for i in range(n):
        changes = [1.0 - _checked_similarity(sim, rows[t][i], rows[t + 1][i], t, i) for t in range(m - 1)]
        per_example.append(math.fsum(changes) / (m - 1))
    return math.fsum(per_example) / n


def series_metrics(
    scores: Sequence[float], outputs: Sequence[Sequence[Any]], similarity: str | Similarity = "exact"
) -> tuple[float | None, float | None]:
    """(MTV, IS) of one (task, variant) series over its trailing horizon, None where fewer than two
    evaluations exist. IS only looks at the newest evaluations with as many examples as the newest one:
    a task that changed size restarts it."""
    rows = trailing_same_length([list(row) for row in outputs])
    mtv = mean_total_variation(scores) if len(scores) >= 2 else None
    instability = instability_score(rows, similarity) if len(rows) >= 2 else None
    return mtv, instability


def trailing_same_length(rows: list[list]) -> list[list]:
    """The newest rows that have as many examples as the newest one."""
    if not rows:
        return rows
    size = len(rows[-1])
    start = len(rows)
    while start > 0 and len(rows[start - 1]) == size:
        start -= 1
    return rows[start:]


def exact_match(a: Any, b: Any) -> float:
    """1.0 if the two outputs are equal, else 0.0.

    >>> exact_match("Paris", "Paris"), exact_match(3, 2)
    (1.0, 0.0)
    """
    return 1.0 if a == b else 0.0


def char_f1(prediction: str, reference: str) -> float:
    """F1 between the multisets of characters of two strings, ignoring all whitespace.

    With ``overlap`` the number of characters shared by both multisets (sum of the minimum counts),
    precision ``P = overlap / len(prediction)`` and recall ``R = overlap / len(reference)``, the result is
    ``2PR / (P + R)``; 0.0 if nothing overlaps. Two empty strings score 1.0, exactly one empty string
    0.0. Non-str arguments are converted with ``str()``. Character order is ignored, so ``"ab"`` and
    ``"ba"`` score 1.0.

    This is deliberately *not* llm-jp-eval's ``char_f1``, which is a fuzzy string-matching ratio (order
    sensitive); the multiset form is symmetric, dependency-free and easy to verify by hand.

    >>> char_f1("abc", "abd")  # overlap 2: P = R = 2/3
    0.6666666666666666
    >>> char_f1("a b", "ba")
    1.0
    """
    pred = "".join(str(prediction).split())
    ref = "".join(str(reference).split())
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    # Algebraically equal to 2PR/(P+R), but a single rounding: exactly symmetric and never above 1.
    return 2 * overlap / (len(pred) + len(ref))


SIMILARITIES: dict[str, Similarity] = {"exact": exact_match, "char_f1": char_f1}

TASK_METRICS: dict[str, Similarity] = {"exact_match": exact_match, "char_f1": char_f1}
"""A ``FunctionTask``'s or ``GenerationTask``'s ``metric`` name -> how it scores one output against its
target (the report re-scores stored outputs by the same names; any other metric is exact equality)."""


def resolve_similarity(similarity: str | Similarity) -> Similarity:
    """Return the similarity callable for a name in :data:`SIMILARITIES`, or a callable unchanged.

    >>> resolve_similarity("exact") is exact_match
    True

    Raises:
        ValueError: an unknown name, or something that is neither a name nor a callable.
    """
    allowed = ", ".join(repr(name) for name in SIMILARITIES)
    if isinstance(similarity, str):
        try:
            return SIMILARITIES[similarity]
        except KeyError:
            raise ValueError(
                f"unknown similarity {similarity!r}; allowed: {allowed}, "
                "or a callable (a, b) -> float in [0, 1]"
            ) from None
    if callable(similarity):
        return similarity
    raise ValueError(
        f"similarity must be one of {allowed} or a callable (a, b) -> float in [0, 1], "
        f"got {type(similarity).__name__}"
    )


def _checked_similarity(sim: Similarity, a: Any, b: Any, t: int, i: int) -> float:
    value = sim(a, b)
    # str is excluded because float("0.5") would silently accept a callable returning text.
    number = None
    if not isinstance(value, (str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number is None or math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(
            f"similarity returned {value!r} for example {i} between checkpoints {t} and {t + 1} "
            f"(outputs {_short(a)} and {_short(b)}); it must return a number in [0, 1]"
        )
    return number


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
