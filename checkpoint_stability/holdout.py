"""The confirmation half of a task's examples: which examples selection may not read.

With ``holdout=h`` (0 < h < 1) an example belongs to the *confirmation* half when

    ``int(sha256(f"{task}/{text}").hexdigest()[:8], 16) / 2**32 < h``

and to the *selection* half otherwise, where ``text`` is the example id itself when it is a string and
``json.dumps(id, sort_keys=True)`` for any other JSON value (``7`` -> ``"7"``, ``True`` -> ``"true"``,
``[1, "a"]`` -> ``'[1, "a"]'``; so the ids ``7`` and ``"7"`` share a half), hashed as UTF-8. The half
depends on nothing but the task name, the id and ``h``: not on the process (no ``hash()``, so
``PYTHONHASHSEED`` does not matter), the order of the examples, the rank that evaluated them or a
resume. An id read back from the history's JSON lands in the same half as before (a tuple comes back
as a list, which dumps to the same text).

Selection reads only selection-half scores; the confirmation half says whether the chosen checkpoint
is as good as it looked.

>>> halves = split("qa", range(10), 0.5)
>>> halves.selection, halves.confirmation
([1, 3, 4], [0, 2, 5, 6, 7, 8, 9])
>>> correct = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
>>> half_score(correct, halves.selection), round(half_score(correct, halves.confirmation), 4)
(0.3333333333333333, 0.7143)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from checkpoint_stability.validation import as_list, is_int, is_real

_SCALE = 2**32


class HoldoutTooSmallError(ValueError):
    """A task has too few examples for ``holdout``: fewer than 2 in a half. A configuration error, raised
    at the task's first evaluation whatever ``on_error`` says (a run must not select on an empty half)."""


@dataclass(frozen=True)
class HoldoutSplit:
    """The two halves of one task's examples, as indices into the ids given to :func:`split`."""

    selection: list[int]
    """Indices of the examples selection may read, in the order given."""
    confirmation: list[int]
    """Indices of the held-out examples that only confirm a choice, in the order given."""


def example_text(example_id: Any) -> str:
    """The text an example id is hashed as: a string as it is, any other JSON value as
    ``json.dumps(id, sort_keys=True)``.

    >>> example_text("q17"), example_text(17), example_text(True), example_text({"b": 1, "a": [2, 3]})
    ('q17', '17', 'true', '{"a": [2, 3], "b": 1}')

    Raises:
        ValueError: the id is not a JSON value (a numpy integer, an object, NaN, ...).
    """
    if isinstance(example_id, str):
        return example_id
    try:
        return json.dumps(example_id, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"example id {example_id!r} ({type(example_id).__name__}) is not a JSON value; "
            "allowed: str, int, finite float, bool, None, and lists or dicts of those"
        ) from error


def check_fraction(fraction: Any) -> float:
    """``fraction`` as a float, or ``ValueError`` unless it is a real number strictly between 0 and 1."""
    if not is_real(fraction) or not 0 < fraction < 1:
        raise ValueError(f"holdout must be a real number strictly between 0 and 1, got {fraction!r}")
    return float(fraction)


def _check_task(task: Any) -> str:
    if not isinstance(task, str):
        raise ValueError(f"task must be a task name (str), got {type(task).__name__}")
    return task


def _in_confirmation(task: str, example_id: Any, fraction: float) -> bool:
    digest = hashlib.sha256(f"{task}/{example_text(example_id)}".encode()).hexdigest()
    return int(digest[:8], 16) / _SCALE < fraction


def is_confirmation(task: str, example_id: Any, fraction: float) -> bool:
    """Whether example ``example_id`` of ``task`` is held out for confirmation at ``holdout=fraction``.

    >>> is_confirmation("qa", 0, 0.5), is_confirmation("qa", 1, 0.5)
    (True, False)

    Raises:
        ValueError: ``fraction`` not a real number in (0, 1); ``task`` not a str; an id that is not JSON.
    """
    return _in_confirmation(_check_task(task), example_id, check_fraction(fraction))


def split(task: str, example_ids: Sequence[Any], fraction: float) -> HoldoutSplit:
    """Cut ``example_ids`` into the selection and confirmation halves at ``holdout=fraction``.

    Each half keeps the order of ``example_ids``; an id's half does not depend on the others.

    >>> split("arc", ["a", "b", "c", "d", "e", "f"], 0.5)
    HoldoutSplit(selection=[0, 1, 2], confirmation=[3, 4, 5])
    >>> split("qa", ["a", "b", "c", "d", "e", "f"], 0.5)
    Traceback (most recent call last):
    ...
    checkpoint_stability.holdout.HoldoutTooSmallError: task 'qa': holdout=0.5 leaves 5 selection and 1 ...

    Raises:
        ValueError: ``fraction`` not a real number in (0, 1); an id that is not JSON.
        HoldoutTooSmallError: fewer than 2 examples in either half (a ``ValueError`` naming the task and
            both counts).
    """
    task = _check_task(task)
    fraction = check_fraction(fraction)
    ids = as_list(example_ids, "example_ids")
    selection: list[int] = []
    confirmation: list[int] = []
    for index, example_id in enumerate(ids):
        (confirmation if _in_confirmation(task, example_id, fraction) else selection).append(index)
    if len(selection) < 2 or len(confirmation) < 2:
        raise HoldoutTooSmallError(
            f"task {task!r}: holdout={fraction} leaves {len(selection)} selection and "
            f"{len(confirmation)} confirmation examples of {len(ids)}; each half needs at least 2 "
            "(use more examples or a holdout nearer 0.5)"
        )
    return HoldoutSplit(selection, confirmation)


def half_score(correct: Sequence[float], indices: Iterable[int]) -> float:
    """The mean of ``correct`` over ``indices`` (one half of a :class:`HoldoutSplit`).

    >>> half_score([1.0, 0.0, 0.5, 1.0], [0, 2])
    0.75

    Raises:
        ValueError: no indices; an index that is not an integer in ``[0, len(correct))``; a value that
            is not a finite real number (bools are refused, as for any score).
    """
    values = as_list(correct, "correct")
    chosen = as_list(indices, "indices")
    if not chosen:
        raise ValueError("half_score needs at least one index, got none")
    total = []
    for index in chosen:
        if not is_int(index) or not 0 <= index < len(values):
            raise ValueError(f"index {index!r} is not an integer in [0, {len(values)})")
        value = values[index]
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"correct[{index}] is {value!r}; expected a finite real number (not a bool)")
        total.append(float(value))
    return math.fsum(total) / len(total)


class HoldoutScorer:
    """Scores one evaluation on both halves, remembering each task's split (examples do not change
    during a run, so the ids are hashed once per task, not at every snapshot).

    >>> scorer = HoldoutScorer(0.5)
    >>> scorer.scores("qa", list(range(10)), [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    (0.3333333333333333, 0.7142857142857143)
    >>> scorer.split("qa", list(range(10))).selection
    [1, 3, 4]
    """

    def __init__(self, fraction: float):
        self.fraction = check_fraction(fraction)
        self._splits: dict[str, tuple[list, HoldoutSplit]] = {}

    def split(self, task: str, example_ids: Sequence[Any]) -> HoldoutSplit:
        """The halves of ``task`` for these ids (cached while the ids stay the same).

        Raises:
            ValueError: as :func:`split` (fewer than 2 examples in a half names the task and the counts).
        """
        ids = list(example_ids)
        cached = self._splits.get(task)
        if cached is not None and cached[0] == ids:
            return cached[1]
        halves = split(task, ids, self.fraction)
        self._splits[task] = (ids, halves)
        return halves

    def scores(self, task: str, example_ids: Sequence[Any], correct: Sequence[float]) -> tuple[float, float]:
        """``(selection score, confirmation score)``: the mean of ``correct`` over each half."""
        halves = self.split(task, example_ids)
        return half_score(correct, halves.selection), half_score(correct, halves.confirmation)
