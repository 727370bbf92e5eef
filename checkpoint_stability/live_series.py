"""LiveSeries: what a live run remembers between snapshots — each series' trailing scores and outputs
(for live MTV and IS) and each task's raw results over the window (for the ensemble) — and how it is
rebuilt from the history when a run directory is (re)opened."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.history import History
from checkpoint_stability.holdout import HoldoutScorer, HoldoutTooSmallError
from checkpoint_stability.records import CHOICE_KINDS, MEAN_TASK, VARIANTS, Evaluation, ScoreSeries
from checkpoint_stability.tasks.base import Task, TaskResult

logger = logging.getLogger(__name__)


class LiveSeries:
    """The live monitor's series: ``raw`` over single snapshots, ``avg`` and ``ens`` over ``window``.

    Example::

        >>> from checkpoint_stability.config import StabilityConfig
        >>> from checkpoint_stability.tasks import FunctionTask
        >>> task = FunctionTask("t", lambda model: [0, 1], targets=[0, 0])
        >>> series = LiveSeries([task], StabilityConfig(window=3))
        >>> raw = TaskResult(outputs=[0, 1], correct=[1.0, 0.0], targets=[0, 0], example_ids=[0, 1])
        >>> series.add_raw("t", 10, raw)
        >>> [(r["task"], r["variant"], r["score"]) for r in series.records(10, {("t", "raw"): raw})]
        [('t', 'raw', 0.5), ('mean', 'raw', 0.5)]
    """

    def __init__(self, tasks: Sequence[Task], config: StabilityConfig, holdout: HoldoutScorer | None = None):
        """``holdout``: the splitter of the examples into halves (default: one from ``config.holdout``)."""
        self.tasks = list(tasks)
        self.config = config
        if holdout is None and config.holdout is not None:
            holdout = HoldoutScorer(config.holdout)
        self.holdout = holdout
        self.unavailable: set[str] = set()
        """Tasks whose examples could not be split into halves (their ids are not JSON values): selection
        reads their whole score, and they have no confirmation score."""
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new run, or before a rebuild)."""
        self.scores = ScoreSeries(self.config.horizon, self.config.similarity)
        self._raw_window: dict[str, deque] = {t.name: deque(maxlen=self.config.window) for t in self.tasks}
        self.avg_models = 0
        """How many snapshots the last avg evaluation averaged."""
        self.snapshots_taken = 0
        """Snapshots of this run so far (the avg cadence, ``average_every``, counts them)."""

    def window_of(self, variant: str) -> int:
        """The window size a variant is computed over (raw: a single snapshot)."""
        return 1 if variant == "raw" else self.config.window

    def models_in(self, task: str, variant: str) -> int:
        """How many snapshots the variant actually combined at this step (fewer early in a run)."""
        if variant == "raw":
            return 1
        if variant == "ens":
            return len(self._raw_window[task])
        return self.avg_models

    def add_raw(self, task: str, step: int, result: TaskResult) -> None:
        """Remember a raw result for the ensemble of the next ``window`` snapshots."""
        self._raw_window[task].append((step, result))

    def ensemble_window(self, task: str) -> list[TaskResult]:
        """The raw results the ensemble combines now, oldest first."""
        return [result for _, result in self._raw_window[task]]

    def ensemble_steps(self, task: str) -> list[int]:
        """The steps whose raw results the ensemble combines now."""
        return [step for step, _ in self._raw_window[task]]

    def records(self, step: int, results: Mapping[tuple[str, str], TaskResult]) -> list[dict]:
        """The records of one snapshot's results (by (task, variant)), each series advanced."""
        evaluations = [
            Evaluation(
                task.name,
                variant,
                self.window_of(variant),
                self.models_in(task.name, variant),
                results[(task.name, variant)].score,
                results[(task.name, variant)].outputs,
                results[(task.name, variant)].targets if task.kind in CHOICE_KINDS else None,
                self.halves(task.name, results[(task.name, variant)]),
            )
            for variant in VARIANTS
            for task in self.tasks
            if (task.name, variant) in results
        ]
        return self.scores.step_records(step, evaluations, [t.name for t in self.tasks], time.time())

    def halves(self, task: str, result: TaskResult) -> tuple[float, float] | None:
        """``(selection score, confirmation score)`` of one result, or None without a holdout or when the
        task's examples cannot be split (warned once per task)."""
        if self.holdout is None or task in self.unavailable:
            return None
        try:
            return self.holdout.scores(task, result.example_ids, result.correct)
        except HoldoutTooSmallError:
            raise
        except ValueError as error:
            self.unavailable.add(task)
            logger.warning(
                "task %r: its examples cannot be split into selection and confirmation halves (%s); "
                "selection reads its whole score and its confirmation score is unavailable",
                task,
                error,
            )
            return None

    def rebuild(self, history: History, avg_models: int) -> int | None:
        """Refill the series and the ensemble's window from ``history``; return its last step (or None)."""
        self.reset()
        self.avg_models = avg_models
        live = {(task.name, variant, self.window_of(variant)) for task in self.tasks for variant in VARIANTS}
        outputs = []
        for task in self.tasks:
            meta = history.meta(task.name)
            for line in history.outputs(task.name):
                key = (task.name, line["variant"], line["window"])
                if key not in live:
                    continue
                outputs.append((*key, line["outputs"]))
                if key[1] == "raw" and meta is not None and len(line["outputs"]) == len(meta["targets"]):
                    result = TaskResult(
                        outputs=line["outputs"],
                        correct=line["correct"],
                        targets=meta["targets"],
                        example_ids=meta["example_ids"],
                        choice_logprobs=line.get("choice_logprobs"),
                    )
                    self.add_raw(task.name, line["step"], result)
        records = history.records()
        self.snapshots_taken = len({r["step"] for r in records})
        names = {task.name for task in self.tasks} | {MEAN_TASK}
        self.scores.restore(
            [r for r in records if r["task"] in names and r["window"] == self.window_of(r["variant"])],
            outputs,
        )
        return history.last_step()
