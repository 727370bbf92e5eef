"""The record format: what one evaluation result looks like, and the one place records are made.

A record is one line of ``history.jsonl`` and one set of logged scalars::

    {"step", "task", "variant", "window", "n_models", "score", "mtv", "is", "time"}

``variant`` is one of :data:`VARIANTS`; ``task`` is a task's name or :data:`MEAN_TASK`, the mean over
tasks; ``mtv`` and ``is`` are taken over the trailing ``horizon`` evaluations of the record's
(task, variant, window) series, its own included, and are None while fewer than two exist. The mean
record's score is the mean over tasks, its MTV that of the mean-score series, its IS the mean of the
tasks' IS.

The live monitor, ``checkpoint-stability analyze`` (and any other producer) make records only through
:class:`ScoreSeries`, so the same inputs give the same records by construction.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from checkpoint_stability.diagnostics import balanced_accuracy, majority_share
from checkpoint_stability.metrics import Similarity, resolve_similarity, series_metrics

VARIANTS: tuple[str, ...] = ("raw", "avg", "ens")
"""``raw``: the model at the step; ``avg``: the window's weight average; ``ens``: the window's ensemble."""
METRICS: tuple[str, ...] = ("score", "mtv", "is")
"""The values a record carries, and the last component of every logged scalar name."""
MEAN_TASK = "mean"
"""The task name of the mean-over-tasks record (reserved: no task may take it)."""
SCALAR_PREFIX = "stability"


Record = TypedDict(
    "Record",
    {
        "step": int,
        "task": str,
        "variant": str,
        "window": int,
        "n_models": int,
        "score": float,
        "mtv": "float | None",
        "is": "float | None",
        "time": float,
    },
)
"""One evaluation result, as written to the history and logged (``is`` is a Python keyword, hence this
form)."""


def scalar_name(task: str, variant: str, metric: str) -> str:
    """The logged name of one scalar, e.g. ``stability/mean/avg/score``.

    >>> scalar_name("mean", "avg", "score")
    'stability/mean/avg/score'
    """
    return f"{SCALAR_PREFIX}/{task}/{variant}/{metric}"


@dataclass(frozen=True)
class Evaluation:
    """What a producer knows about one (task, variant, window) result at a step, before it is a record."""

    task: str
    variant: str
    window: int
    n_models: int
    score: float
    outputs: Sequence[Any] | None
    """Per-example outputs (for IS); None when there are none to compare."""
    targets: Sequence[Any] | None = None
    """Per-example targets of a task that picks one answer among a fixed set (multiple choice,
    classification): its records then carry the answer-bias fields (:data:`BIAS_FIELDS`)."""
    halves: tuple[float, float] | None = None
    """``(selection score, confirmation score)`` with ``holdout`` set (:data:`HOLDOUT_FIELDS`); None
    without a holdout, or when the task's examples cannot be split."""


CHOICE_KINDS = ("multiple_choice", "classification")
"""Task kinds whose outputs are one answer out of a fixed set: their records carry :data:`BIAS_FIELDS`."""

BIAS_FIELDS = ("majority_share", "balanced_accuracy")
"""Added to a choice task's records: the share of its most-predicted answer, and its balanced accuracy
(the mean per-class recall), so that a variant collapsing onto one answer shows (a vote across
checkpoints biased in opposite directions can). Older histories lack them; older readers ignore them."""


HOLDOUT_FIELDS = ("selection_score", "confirmation_score")
"""Added to every record when ``holdout`` is set and the task has per-example scores: the score on the
selection half (what selection reads) and on the confirmation half (what confirms a choice). ``score``
stays the score over all examples. A mean record carries them when every task does."""


def mean_halves(per_task: Sequence[Mapping]) -> dict[str, float]:
    """The mean record's :data:`HOLDOUT_FIELDS` from its tasks' records.

    Selection must work for every task, so a task without halves lends its whole score to the selection
    mean (as selection did before holdouts existed); the confirmation mean needs every task's, else it is
    left out (unavailable). No task with halves: nothing (the run has no holdout).

    >>> mean_halves([{"score": 0.5, "selection_score": 0.4, "confirmation_score": 0.6}, {"score": 0.8}])
    {'selection_score': 0.6000000000000001}
    """
    if not any("selection_score" in record for record in per_task):
        return {}
    selection = [record.get("selection_score", record["score"]) for record in per_task]
    fields = {"selection_score": sum(selection) / len(selection)}
    if all("confirmation_score" in record for record in per_task):
        fields["confirmation_score"] = sum(r["confirmation_score"] for r in per_task) / len(per_task)
    return fields


def bias_fields(outputs: Sequence[Any], targets: Sequence[Any]) -> dict[str, float]:
    """:data:`BIAS_FIELDS` of one result.

    >>> bias_fields([0, 0, 0, 1], [0, 1, 0, 1])
    {'majority_share': 0.75, 'balanced_accuracy': 0.75}
    """
    return {
        "majority_share": majority_share(outputs),
        "balanced_accuracy": balanced_accuracy(outputs, targets),
    }


def make_record(
    step: int,
    task: str,
    variant: str,
    window: int,
    n_models: int,
    score: float,
    mtv: float | None,
    instability: float | None,
    time: float,
) -> Record:
    """A record as it is written and logged."""
    return {
        "step": int(step),
        "task": task,
        "variant": variant,
        "window": int(window),
        "n_models": max(1, int(n_models or 1)),
        "score": float(score),
        "mtv": mtv,
        "is": instability,
        "time": float(time),
    }


class ScoreSeries:
    """The trailing ``horizon`` of every (task, variant, window) series, and the records made from it.

    ``step_records`` appends a step's results to their series and returns the step's records: one per
    result, and a mean record for each (variant, window) every task reached. A producer that resumes
    restores the series first (``restore``) from what its history holds, so its next records continue
    the same MTV and IS.

    Example::

        >>> series = ScoreSeries(horizon=3)
        >>> for step, outputs in ((10, [0, 1]), (20, [0, 0])):
        ...     score = sum(o == t for o, t in zip(outputs, [0, 0])) / 2
        ...     raw = Evaluation("t", "raw", window=1, n_models=1, score=score, outputs=outputs)
        ...     records = series.step_records(step, [raw], ["t"], time=0.0)
        >>> [(r["task"], r["score"], r["mtv"], r["is"]) for r in records]
        [('t', 1.0, 0.5, 0.5), ('mean', 1.0, 0.5, 0.5)]
    """

    def __init__(self, horizon: int, similarity: str | Similarity = "exact"):
        self.horizon = horizon
        self.similarity = resolve_similarity(similarity)
        self._scores: dict[tuple[str, str, int], deque] = {}
        self._outputs: dict[tuple[str, str, int], deque] = {}

    def _series(self, key: tuple[str, str, int]) -> tuple[deque, deque]:
        if key not in self._scores:
            self._scores[key] = deque(maxlen=self.horizon)
            self._outputs[key] = deque(maxlen=self.horizon)
        return self._scores[key], self._outputs[key]

    def restore(self, records: Iterable[Mapping], outputs: Iterable[tuple[str, str, int, Sequence]]) -> None:
        """Refill the series from a history: score ``records`` and per-example ``outputs`` given as
        ``(task, variant, window, outputs)``, each in step order. Earlier contents are dropped."""
        self._scores.clear()
        self._outputs.clear()
        for record in records:
            self._series((record["task"], record["variant"], record["window"]))[0].append(record["score"])
        for task, variant, window, line in outputs:
            self._series((task, variant, window))[1].append(line)

    def scores(self, task: str, variant: str, window: int) -> list[float]:
        """The series' trailing scores, oldest first."""
        return list(self._series((task, variant, window))[0])

    def add(self, evaluation: Evaluation, score: float | None = None) -> None:
        """Append one result to its series (``score`` overrides the evaluation's, e.g. a stored one)."""
        scores, outputs = self._series((evaluation.task, evaluation.variant, evaluation.window))
        scores.append(evaluation.score if score is None else score)
        if evaluation.outputs is not None:
            outputs.append(evaluation.outputs)

    def record(self, step: int, evaluation: Evaluation, time: float) -> dict:
        """The record of a result already added: MTV and IS over its series' trailing horizon."""
        scores, outputs = self._series((evaluation.task, evaluation.variant, evaluation.window))
        mtv, instability = series_metrics(list(scores), list(outputs), self.similarity)
        record = dict(  # a plain dict: producers add to it (the mean record's IS) and pass it on
            make_record(
                step,
                evaluation.task,
                evaluation.variant,
                evaluation.window,
                evaluation.n_models,
                scores[-1],
                mtv,
                instability,
                time,
            )
        )
        if evaluation.targets is not None and evaluation.outputs is not None:
            record.update(bias_fields(evaluation.outputs, evaluation.targets))
        if evaluation.halves is not None:
            record.update(zip(HOLDOUT_FIELDS, evaluation.halves, strict=True))
        return record

    def step_records(
        self,
        step: int,
        evaluations: Sequence[Evaluation],
        task_names: Sequence[str],
        time: float,
        known: Mapping[tuple[str, str, int], Mapping] | None = None,
    ) -> list[dict]:
        """Add a step's results to their series; return its records, grouped by (variant, window) in the
        order first given, tasks in ``task_names`` order, each group's mean record last.

        ``known``: records of this step already stored, by (task, variant, window); their score joins
        the series and they are returned as they are (an analysis rerun skips what is done).
        """
        known = known or {}
        groups: dict[tuple[str, int], dict[str, Evaluation]] = {}
        for evaluation in evaluations:
            groups.setdefault((evaluation.variant, evaluation.window), {})[evaluation.task] = evaluation
        records = []
        for (variant, window), by_task in groups.items():
            per_task = []
            for name in task_names:
                found = by_task.get(name)
                if found is None:
                    continue
                stored = known.get((name, variant, window))
                self.add(found, score=None if stored is None else stored["score"])
                record = dict(stored) if stored is not None else self.record(step, found, time)
                records.append(record)
                per_task.append(record)
            if per_task and len(per_task) == len(task_names):
                records.append(self._mean_record(step, variant, window, per_task, time, known))
        return records

    def _mean_record(
        self,
        step: int,
        variant: str,
        window: int,
        per_task: list[dict],
        time: float,
        known: Mapping[tuple[str, str, int], Mapping],
    ) -> dict:
        mean_score = sum(r["score"] for r in per_task) / len(per_task)
        stored = known.get((MEAN_TASK, variant, window))
        mean = Evaluation(MEAN_TASK, variant, window, per_task[0]["n_models"], mean_score, None)
        self.add(mean, score=None if stored is None else stored["score"])
        if stored is not None:
            return dict(stored)
        record = self.record(step, mean, time)
        iss = [r["is"] for r in per_task]
        record["is"] = None if any(v is None for v in iss) else sum(iss) / len(iss)
        record.update(mean_halves(per_task))
        return record
