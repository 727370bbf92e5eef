"""SelectionEvidence: whether the checkpoint selection chose is better than the one a user would have
picked, measured on examples selection never read, and how sure that is.

Kept on rank 0 beside the selector and written into ``best.json`` as ``"evidence"`` at every snapshot
once a best exists (DESIGN.md, "Selection evidence"):

- ``chosen``: the exported best, with its selection-half and confirmation-half scores;
- ``naive``: the raw checkpoint with the best selection score so far (what "pick the best validation
  score" picks), ``final_raw``: the newest raw checkpoint;
- ``best_candidate``: the best confirmation score among every candidate the ``select`` policy allowed
  so far, and ``regret`` = its confirmation score − the chosen one's (0 when the choice was the best
  possible; for ``select_mode="min"`` the sign is turned so that regret stays >= 0);
- ``intervals``: paired bootstrap intervals over examples at the chosen step (computed when a new best
  is chosen): the chosen score, ``avg − raw`` and ``ens − raw``; for the mean over tasks each task's
  examples are resampled within the task.

Without ``holdout`` the same numbers are computed on all examples — the ones selection read, so the
chosen score is biased upward — and ``examples`` says ``"all"``.

Example::

    >>> from checkpoint_stability.config import StabilityConfig
    >>> evidence = SelectionEvidence(StabilityConfig(holdout=0.5, select="avg"))
    >>> def record(step, variant, selection, confirmation):
    ...     return {"step": step, "task": "mean", "variant": variant, "window": 1, "score": 0.0,
    ...             "n_models": 2, "selection_score": selection, "confirmation_score": confirmation}
    >>> evidence.observe([record(10, "raw", 0.70, 0.50), record(10, "avg", 0.60, 0.58)])
    >>> evidence.observe([record(20, "raw", 0.65, 0.55), record(20, "avg", 0.66, 0.62)])
    >>> found = evidence.to_json({"step": 20, "variant": "avg"})
    >>> found["naive"]["step"], found["naive"]["confirmation_score"], found["regret"]
    (10, 0.5, 0.0)
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from checkpoint_stability.bootstrap import Interval, paired_stratified_difference, stratified_interval
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.holdout import HoldoutScorer
from checkpoint_stability.records import MEAN_TASK
from checkpoint_stability.tasks.base import TaskResult

logger = logging.getLogger(__name__)

RESAMPLES = 1000
"""Bootstrap resamples per interval (about 20 ms at 2,048 examples: benchmarks/RESULTS.md)."""
SEED = 0
"""The bootstrap's seed: the same run gives the same intervals on every machine."""
CONFIDENCE = 0.95
"""The intervals' nominal coverage."""

_CANDIDATES = {"avg": ("avg",), "raw": ("raw",), "any": ("avg", "raw", "ens")}
_DIFFERENCES = (("avg_minus_raw", "avg"), ("ens_minus_raw", "ens"))


class SelectionEvidence:
    """The running comparison of the chosen checkpoint with the naive pick, the final raw checkpoint and
    the best candidate, on the confirmation half; see the module docstring.

    ``observe`` takes each snapshot's records (any order, any tasks: only ``select_metric``'s are read);
    ``rebuild`` replays a history after a (re)open; ``intervals`` computes the bootstrap intervals of a
    new best from that step's per-example results; ``to_json`` is what goes into ``best.json``.
    """

    def __init__(self, config: StabilityConfig, holdout: HoldoutScorer | None = None):
        """``holdout``: the splitter the run uses (default: one made from ``config.holdout``)."""
        self.config = config
        if holdout is None and config.holdout is not None:
            holdout = HoldoutScorer(config.holdout)
        self.holdout = holdout
        self._sign = 1.0 if config.select_mode == "max" else -1.0
        self._allowed = _CANDIDATES.get(config.select or "", ())
        self.reset()

    def reset(self) -> None:
        """Forget every observation (a new run, or before a rebuild)."""
        self._entries: dict[tuple[int, str], dict] = {}
        self._steps: set[int] = set()
        self.naive: dict | None = None
        self.final_raw: dict | None = None
        self.best_candidate: dict | None = None
        self.last_step: int | None = None
        self._intervals: dict[str, Any] = {}
        self._intervals_of: tuple[int, str] | None = None
        self.unavailable: set[str] = set()
        """Tasks whose confirmation scores are unavailable (their examples could not be split)."""

    # ------------------------------------------------------------------ observing

    def observe(self, records: Sequence[Mapping]) -> None:
        """Take one snapshot's records into account.

        A record is a candidate once the run has taken ``min_snapshots`` snapshots (or ``window``, if
        smaller), as for the selector; the naive pick is any raw checkpoint, as a user's would be."""
        self._steps.update(int(record["step"]) for record in records)
        window = self.config.window
        eligible = min(len(self._steps), window) >= min(self.config.min_snapshots, window)
        for record in records:
            if record["task"] != self.config.select_metric:
                continue
            entry = self._entry(record)
            variant, step = entry["variant"], entry["step"]
            self.last_step = step if self.last_step is None else max(self.last_step, step)
            if variant == "raw":
                if self.final_raw is None or step >= self.final_raw["step"]:
                    self.final_raw = entry
                if self.naive is None or self._better(
                    entry["selection_score"], self.naive["selection_score"]
                ):
                    self.naive = entry
            if variant in self._allowed and eligible:
                self._entries[(step, variant)] = entry
                if entry["confirmation_score"] is not None and (
                    self.best_candidate is None
                    or self._better(entry["confirmation_score"], self.best_candidate["confirmation_score"])
                ):
                    self.best_candidate = entry

    def rebuild(
        self, records: Sequence[Mapping], best: Mapping | None, unavailable: Collection[str] = ()
    ) -> None:
        """Replay the history's ``records`` (in file order) after a (re)open; keep the intervals that
        ``best`` (the pointer on disk) already holds for itself."""
        self.reset()
        self.unavailable = set(unavailable)
        by_step: dict[int, list[Mapping]] = {}
        for record in records:
            by_step.setdefault(int(record["step"]), []).append(record)
        for step in sorted(by_step):
            self.observe(by_step[step])
        stored = (best or {}).get("evidence")
        if best is not None and isinstance(stored, Mapping) and isinstance(stored.get("intervals"), Mapping):
            self._intervals = dict(stored["intervals"])
            self._intervals_of = (int(best["step"]), str(best["variant"]))

    def _entry(self, record: Mapping) -> dict:
        score = float(record["score"])
        if self.holdout is not None:
            selection = record.get("selection_score", score)
            confirmation = record.get("confirmation_score")
        else:
            selection = confirmation = score
        return {
            "step": int(record["step"]),
            "variant": str(record["variant"]),
            "selection_score": None if selection is None else float(selection),
            "confirmation_score": None if confirmation is None else float(confirmation),
        }

    def _better(self, value: float | None, than: float | None) -> bool:
        if value is None:
            return False
        return than is None or self._sign * value > self._sign * than

    # ------------------------------------------------------------------ intervals

    def intervals(
        self,
        step: int,
        variant: str,
        results: Mapping[tuple[str, str], TaskResult],
        task_names: Sequence[str],
    ) -> None:
        """Compute the bootstrap intervals of the new best (``variant`` at ``step``) from the step's
        per-example ``results`` (by (task, variant)); kept until the next new best. An interval whose
        variants were not all evaluated at the step (``avg`` thinned by ``average_every``, ``ens`` off)
        is None."""
        tasks = list(task_names) if self.config.select_metric == MEAN_TASK else [self.config.select_metric]
        self._intervals_of = (int(step), str(variant))
        self._intervals = {"score": None, "avg_minus_raw": None, "ens_minus_raw": None}
        if any(task in self.unavailable for task in tasks):
            return
        chosen = self._groups(tasks, variant, results)
        if chosen is not None:
            self._intervals["score"] = _json(
                stratified_interval(chosen, resamples=RESAMPLES, seed=SEED, confidence=CONFIDENCE)
            )
        raw = self._groups(tasks, "raw", results)
        for name, other in _DIFFERENCES:
            groups = self._groups(tasks, other, results)
            if raw is not None and groups is not None:
                self._intervals[name] = _json(
                    paired_stratified_difference(
                        groups, raw, resamples=RESAMPLES, seed=SEED, confidence=CONFIDENCE
                    )
                )

    def _groups(
        self, tasks: Sequence[str], variant: str, results: Mapping[tuple[str, str], TaskResult]
    ) -> list[list[float]] | None:
        """Each task's per-example scores of ``variant`` on the examples the evidence uses; None when a
        task has no result for it at this step."""
        groups = []
        for task in tasks:
            result = results.get((task, variant))
            if result is None:
                return None
            if self.holdout is None:
                groups.append(list(result.correct))
            else:
                indices = self.holdout.split(task, result.example_ids).confirmation
                groups.append([result.correct[i] for i in indices])
        return groups

    # ------------------------------------------------------------------ reporting

    def to_json(self, best: Mapping) -> dict | None:
        """The ``"evidence"`` of ``best.json`` for the best ``best`` (its ``step`` and ``variant``); None
        when selection is off or nothing of the metric was observed."""
        if not self._allowed or self.last_step is None:
            return None
        key = (int(best["step"]), str(best["variant"]))
        chosen = self._entries.get(key)
        regret = None
        if chosen is not None and self.best_candidate is not None:
            mine, top = chosen["confirmation_score"], self.best_candidate["confirmation_score"]
            if mine is not None and top is not None:
                regret = max(0.0, self._sign * (top - mine))
        intervals = self._intervals if self._intervals_of == key else {}
        return {
            "holdout": self.holdout.fraction if self.holdout is not None else None,
            "examples": "confirmation" if self.holdout is not None else "all",
            "metric": self.config.select_metric,
            "as_of": self.last_step,
            "chosen": chosen,
            "naive": self.naive,
            "final_raw": self.final_raw,
            "best_candidate": self.best_candidate,
            "regret": regret,
            "intervals": {
                "score": intervals.get("score"),
                "avg_minus_raw": intervals.get("avg_minus_raw"),
                "ens_minus_raw": intervals.get("ens_minus_raw"),
            },
            "unavailable": sorted(self.unavailable),
        }


def _json(interval: Interval) -> dict:
    return interval.to_json()


__all__ = ["CONFIDENCE", "RESAMPLES", "SEED", "SelectionEvidence"]
