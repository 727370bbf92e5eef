"""Weights & Biases sink: the stability scalars on the trainer's step axis, one chart per task, the
selected best model in the summary and, at the end of a run, its export as a model artifact."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.records import MEAN_TASK, METRICS, VARIANTS, scalar_name
from checkpoint_stability.sinks.base import layout_task_names, scalar_items
from checkpoint_stability.validation import require_int

logger = logging.getLogger(__name__)

# Higher is better for a score; MTV and IS measure instability, so lower is better.
SUMMARIES = {"score": "max", "mtv": "min", "is": "min"}

# The best.json fields copied to the run summary as stability/best/<field>.
BEST_SUMMARY_FIELDS = ("step", "score", "variant", "steps", "path")
# The best's scalars on the step axis; their summary is the last value, i.e. the current best.
BEST_SCALARS = ("step", "score")


def chart_key(task: str) -> str:
    """The key of a task's raw/avg/ens chart, e.g. ``stability/mean/chart``."""
    return f"stability/{task}/chart"


def best_artifact_name(run: Any) -> str:
    """The model artifact's name, stable across a run's resumes: ``<run name or id>-stability-best``
    with every run of characters W&B refuses in a name (it allows letters, digits, ``-``, ``_``,
    ``.``) replaced by one ``-``, e.g. ``"lr 3e-4/ablation #2"`` -> ``lr-3e-4-ablation-2-stability-best``.
    """
    suffix = "-stability-best"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(getattr(run, "name", None) or run.id)).strip("-")
    return base[: 128 - len(suffix)] + suffix  # W&B caps names at 128 characters


class WandbSink:
    """Log stability records to a W&B run.

    Every scalar key (``stability/<task>/<variant>/<metric>``) is declared once with
    ``run.define_metric(key, step_metric=step_metric, summary=...)``, so W&B plots it against the
    training step rather than its own call counter, and the run summary keeps the best value: the
    maximum for scores, the minimum for MTV and IS. Each ``run.log`` payload carries the step-axis value
    itself (``{step_metric: step}``), as Lightning's ``WandbLogger`` does with ``trainer/global_step``.

    W&B has no multi-line chart built from scalar keys that a run can define, so besides the scalars
    the sink logs one ``wandb.plot.line_series`` per task (``"mean"`` first) under
    ``stability/<task>/chart``: the raw, avg and ens score over steps on one set of axes. A chart holds
    its whole series and W&B stores every logged version, so it is re-logged at the first snapshot,
    then every ``chart_every`` snapshots, and once more by :meth:`close` if the series grew since.

    W&B stores such a chart as a table (``stability/<task>/chart_table``, columns ``step``, ``lineKey``,
    ``lineVal``) plus, in the run config under ``_wandb.visualize``, the preset ``wandb/lineseries/v0``
    with its fields mapped to those columns; the preset draws one line, in its own colour and legend
    entry, per ``lineKey`` value, and ``lineKey`` holds the variant (raw, avg, ens).

    The selected best model (:meth:`best_changed`) goes to the run summary as
    ``stability/best/{step,score,variant,steps,path}``, and its step and score are logged as
    ``stability/best/step`` and ``stability/best/score`` on the step axis at each change. When a run
    ends (:meth:`run_ended`) the final best's exported directory is logged as a model artifact.

    Every key starts with ``stability/``: W&B groups panels by the first path component, so everything
    lands in one "stability" section.

    ``run``: the run to log to (Lightning: ``WandbLogger.experiment``); ``None`` means ``wandb.run`` at
    the first write. The run belongs to the caller: :meth:`close` does not finish it.

    Example::

        run = wandb.init(project="pretraining")
        sink = WandbSink(run, task_names=["hellaswag"])
        sink.write(500, records)  # scalars at trainer/global_step=500, charts stability/*/chart
        sink.best_changed(500, best, export)  # the monitor does this; summary stability/best/*
        sink.run_ended()  # the final best's export -> artifact "<run>-stability-best:best"
        sink.close()
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_metric: str = "trainer/global_step",
        task_names: Sequence[str] = (),
        chart_every: int = 10,
    ) -> None:
        if not isinstance(step_metric, str) or not step_metric:
            raise ValueError(f"step_metric must be a non-empty metric name, got {step_metric!r}")
        chart_every = require_int("chart_every", chart_every, 1)
        if run is not None:
            for method in ("log", "define_metric"):
                if not callable(getattr(run, method, None)):
                    raise ValueError(f"run must be a wandb run with {method}(), got {type(run).__name__}")
        self._run = run
        self.step_metric = step_metric
        self.task_names = layout_task_names(task_names)
        self.chart_every = chart_every
        self._defined: set[str] = set()
        # (task, variant) -> [(step, score)], the series the charts are drawn from.
        self._series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self._writes = 0
        self._charted_writes = 0
        self._last_step: int | None = None
        self._declared = False
        # The current best (best.json content) and its export directory, None for an ensemble.
        self._best: dict | None = None
        self._best_export: Path | None = None
        self._closed = False

    @property
    def run(self) -> Any:
        if self._run is None:
            import wandb

            if wandb.run is None:
                raise RuntimeError("WandbSink has no run: pass run= or call wandb.init() before training")
            self._run = wandb.run
        return self._run

    def preload(self, records: Iterable[dict]) -> None:
        """Seed the chart series with earlier score records (a resumed run's history), logging nothing."""
        for record in records:
            if record.get("variant") in VARIANTS and record.get("score") is not None:
                step, score = int(record["step"]), float(record["score"])
                self._add_point(record["task"], record["variant"], step, score)

    def write(self, step: int, records: list[dict]) -> None:
        """Log the scalars of ``records`` at ``step`` on the step axis; re-log the charts when due."""
        if self._closed:
            raise RuntimeError("WandbSink.write called after close()")
        for record in records:
            if "step" in record and record["step"] != step:
                raise ValueError(
                    f"records must all be of step {step}, got a record of step {record['step']!r}"
                )
        items = scalar_items(records)
        run = self.run
        self._define(run, items)
        for record in records:
            if record.get("score") is not None:
                self._add_point(record["task"], record["variant"], step, float(record["score"]))
        payload: dict[str, Any] = dict(items)
        self._writes += 1
        self._last_step = step
        if self._writes == 1 or self._writes - self._charted_writes >= self.chart_every:
            payload.update(self._charts())
            self._charted_writes = self._writes
        payload[self.step_metric] = step
        run.log(payload)

    def best_updated(self, best: Mapping[str, Any]) -> None:
        """What ``best.json`` says about the same best model changed (its evidence): the final artifact's
        metadata is the newest."""
        if self._best is not None and best.get("step") == self._best.get("step"):
            self._best = dict(best)

    def drift(self, step: int, values: Mapping[str, float | None]) -> None:
        """How far the weights moved at snapshot ``step``: ``stability/drift/{previous,average}`` on the
        step axis (a value that is None is not logged)."""
        if self._closed:
            raise RuntimeError("WandbSink.drift called after close()")
        step = require_int("step", step, 0)
        payload = {f"stability/drift/{name}": float(v) for name, v in values.items() if v is not None}
        if not payload:
            return
        run = self.run
        self._define_step_axis(run)
        for name in payload:
            if name not in self._defined:
                run.define_metric(name, step_metric=self.step_metric, summary="last")
                self._defined.add(name)
        run.log({**payload, self.step_metric: step})

    def best_changed(self, step: int, best: Mapping[str, Any], export: Path | None) -> None:
        """Record a new selected best (``best``: best.json's content) at snapshot ``step``.

        Sets the run summary's ``stability/best/{step,score,variant,steps,path}`` to ``best``'s fields
        and logs ``stability/best/step`` and ``stability/best/score`` (when scored) on the step axis at
        ``step``. ``export`` (the exported model's directory, None for an ensemble) is only remembered:
        :meth:`run_ended` uploads the final one.
        """
        if self._closed:
            raise RuntimeError("WandbSink.best_changed called after close()")
        step = require_int("step", step, 0)
        summary = {f"stability/best/{field}": best[field] for field in BEST_SUMMARY_FIELDS}
        run = self.run
        self._define_step_axis(run)
        for field in BEST_SCALARS:
            name = f"stability/best/{field}"
            if name not in self._defined:
                run.define_metric(name, step_metric=self.step_metric, summary="last")
                self._defined.add(name)
        payload = {f"stability/best/{f}": best[f] for f in BEST_SCALARS if best[f] is not None}
        run.log({**payload, self.step_metric: step})
        # Set after the log, so the explicit values are the summary's final word (the same values).
        run.summary.update(summary)
        self._best = dict(best)
        self._best_export = None if export is None else Path(export)

    def run_ended(self) -> None:
        """Log the final best's exported model directory as a W&B model artifact.

        Only the final best is uploaded, once the run has finished: every intermediate best would be a
        full model (often several GB) uploaded only to be superseded. The artifact is named
        :func:`best_artifact_name` (one name per run, so a resumed run adds a version), has type
        ``"model"``, best.json's content as metadata and the aliases ``best`` and ``step-<step>``.
        An offline run records it (W&B stages a copy of the files) for a later ``wandb sync``.

        Nothing is logged for an ensemble best (no weights) or when no best was selected; an export
        directory that no longer exists is reported with a warning. A failure to log raises.
        """
        if self._best is None or self._best_export is None:
            return
        export = self._best_export
        if not export.is_dir():
            logger.warning(
                "the best model's export %s no longer exists: no W&B model artifact logged", export
            )
            return
        import wandb

        run = self.run
        artifact = wandb.Artifact(name=best_artifact_name(run), type="model", metadata=self._best)
        artifact.add_dir(str(export))
        run.log_artifact(artifact, aliases=["best", f"step-{self._best['step']}"])

    def close(self) -> None:
        """Log the final charts if the series grew since the last ones. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._writes > self._charted_writes and self._last_step is not None:
            self.run.log({**self._charts(), self.step_metric: self._last_step})
            self._charted_writes = self._writes

    # ------------------------------------------------------------------ internals

    def _define_step_axis(self, run: Any) -> None:
        if self.step_metric not in self._defined:
            run.define_metric(self.step_metric)
            self._defined.add(self.step_metric)

    def _define(self, run: Any, items: dict[str, float]) -> None:
        self._define_step_axis(run)
        if not self._declared:
            self._declared = True
            # Declare the known keys up front, so the summary aggregates are there from the first point.
            for task in self.task_names:
                for variant in VARIANTS:
                    for metric in METRICS:
                        self._define_one(run, scalar_name(task, variant, metric), metric)
        for name in items:
            self._define_one(run, name, name.rsplit("/", 1)[-1])

    def _define_one(self, run: Any, name: str, metric: str) -> None:
        if name in self._defined:
            return
        run.define_metric(name, step_metric=self.step_metric, summary=SUMMARIES[metric])
        self._defined.add(name)

    def _add_point(self, task: str, variant: str, step: int, score: float) -> None:
        series = self._series.setdefault((task, variant), [])
        # A step seen again is a resumed run overwriting the abandoned trajectory's point.
        while series and series[-1][0] >= step:
            series.pop()
        series.append((step, score))

    def _charts(self) -> dict[str, Any]:
        import wandb

        tasks = [MEAN_TASK, *[t for t, _ in self._series if t != MEAN_TASK]]
        charts = {}
        for task in dict.fromkeys(tasks):
            lines = [(v, self._series.get((task, v), [])) for v in VARIANTS]
            lines = [(v, points) for v, points in lines if points]
            if not lines:
                continue
            charts[chart_key(task)] = wandb.plot.line_series(
                xs=[[s for s, _ in points] for _, points in lines],
                ys=[[score for _, score in points] for _, points in lines],
                keys=[v for v, _ in lines],
                title=f"{task}: score (raw / avg / ens)",
                xname=self.step_metric,
            )
        return charts
