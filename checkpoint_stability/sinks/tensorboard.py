"""TensorBoard sink: one TensorBoard run per variant (``raw``, ``avg``, ``ens``) plus a ``best`` run, so
every card of TensorBoard's default Time Series tab overlays the three variants in distinct colours."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.records import METRICS, SCALAR_PREFIX, VARIANTS
from checkpoint_stability.sinks.base import layout_task_names
from checkpoint_stability.validation import require_int

BEST_RUN = "best"
RATIOS = ("mtv", "is")
"""Metrics also logged as a ratio to raw's (``<metric>_ratio``) in the avg and ens runs."""
BEST_TEXT_TAG = f"{SCALAR_PREFIX}/best"


DRIFT_PREFIX = f"{SCALAR_PREFIX}/drift"
"""Tags ``stability/drift/previous`` and ``stability/drift/average`` (in the ``raw`` run)."""


def run_tag(task: str, metric: str) -> str:
    """The tag of one metric of one task inside a variant's run, e.g. ``stability/mean/score``.

    >>> run_tag("hellaswag", "mtv_ratio")
    'stability/hellaswag/mtv_ratio'
    """
    return f"{SCALAR_PREFIX}/{task}/{metric}"


def run_scalars(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """The scalars of one step's records by run: ``{variant: {tag: value}}``.

    Each variant's run holds ``stability/<task>/{score,mtv,is}`` (a metric that is None is left out);
    the avg and ens runs also hold ``stability/<task>/{mtv,is}_ratio``, the variant's value divided by
    raw's at the same step (left out when either is missing or raw's is 0).

    >>> run_scalars([{"task": "t", "variant": "raw", "score": 0.5, "mtv": 0.2, "is": None},
    ...              {"task": "t", "variant": "avg", "score": 0.6, "mtv": 0.1, "is": 0.3}])
    {'raw': {'stability/t/score': 0.5, 'stability/t/mtv': 0.2}, 'avg': {'stability/t/score': 0.6, 'stability/t/mtv': 0.1, 'stability/t/is': 0.3, 'stability/t/mtv_ratio': 0.5}}
    """  # noqa: E501
    by_key: dict[tuple[str, str], dict] = {}
    for record in records:
        task, variant = record.get("task"), record.get("variant")
        if not isinstance(task, str) or not task:
            raise ValueError(f"record task must be a non-empty string, got {task!r}")
        if variant not in VARIANTS:
            raise ValueError(f"record variant must be one of {list(VARIANTS)}, got {variant!r}")
        if (task, variant) in by_key:
            raise ValueError(
                f"records must hold one record per (task, variant), got two for {task}/{variant}"
            )
        by_key[(task, variant)] = record
    runs: dict[str, dict[str, float]] = {}
    for (task, variant), record in by_key.items():
        scalars = runs.setdefault(variant, {})
        for metric in METRICS:
            if record.get(metric) is not None:
                scalars[run_tag(task, metric)] = float(record[metric])
        raw = by_key.get((task, "raw"))
        if variant == "raw" or raw is None:
            continue
        for metric in RATIOS:
            mine, base = record.get(metric), raw.get(metric)
            if mine is not None and base:
                scalars[run_tag(task, f"{metric}_ratio")] = float(mine) / float(base)
    return {variant: runs[variant] for variant in VARIANTS if variant in runs}


def custom_scalars_layout(task_names: Sequence[str], *, drift: bool = True) -> dict:
    """Custom Scalars layout over the per-variant runs: per task, one chart per metric whose lines are
    the runs (raw, avg, ens) holding that tag; ``"mean"`` first, left out when there is one task (it
    equals that task). The format ``SummaryWriter.add_custom_scalars`` takes:
    ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``. ``drift``: add the weight-drift
    chart (``stability/drift/previous`` and ``average``, in the raw run).

    >>> sorted(custom_scalars_layout(["hellaswag"]))
    ['stability: hellaswag', 'stability: weight drift']
    >>> custom_scalars_layout(["hellaswag"])["stability: hellaswag"]["score (raw, avg, ens)"]
    ['Multiline', ['^stability/hellaswag/score$']]
    """
    tasks = layout_task_names(task_names)
    if len(tasks) == 2:  # "mean" and one task: the mean is that task's score
        tasks = tasks[1:]
    charts = (
        ("score (raw, avg, ens)", "score"),
        ("MTV (raw, avg, ens)", "mtv"),
        ("IS (raw, avg, ens)", "is"),
        ("MTV / raw's (avg, ens)", "mtv_ratio"),
        ("IS / raw's (avg, ens)", "is_ratio"),
    )
    layout = {
        f"stability: {task}": {
            title: ["Multiline", [f"^{re.escape(run_tag(task, metric))}$"]] for title, metric in charts
        }
        for task in tasks
    }
    if not drift:
        return layout
    layout["stability: weight drift"] = {
        "‖θ_t − θ_prev‖ / ‖θ_t‖ and ‖θ_t − θ̄‖ / ‖θ_t‖": ["Multiline", [f"^{re.escape(DRIFT_PREFIX)}/"]]
    }
    return layout


def best_markdown(best: dict, export: Path | None) -> str:
    """``best.json`` as a small markdown table, the text the ``best`` run shows."""
    steps = best.get("steps") or [best.get("step")]
    rows = [
        ("step", best.get("step")),
        ("variant", best.get("variant")),
        ("steps averaged" if best.get("variant") == "avg" else "window steps", ", ".join(map(str, steps))),
        (f"score ({best.get('metric') or 'mean'}, {best.get('mode') or 'max'})", best.get("score")),
        *((f"score of {task}", value) for task, value in (best.get("scores") or {}).items()),
        *_evidence_rows(best),
        ("export", export if export is not None else "none (an ensemble is not one set of weights)"),
    ]
    lines = ["| | |", "| --- | --- |"]
    lines += [
        f"| {name} | {json.dumps(value) if isinstance(value, float) else value} |" for name, value in rows
    ]
    return "\n".join(lines)


def _evidence_rows(best: dict) -> list[tuple[str, object]]:
    """The selection-half score and, from ``evidence``, the confirmation comparison."""
    rows: list[tuple[str, object]] = []
    if best.get("selection_score") is not None:
        rows.append(("selection-half score", best["selection_score"]))
    evidence = best.get("evidence")
    if not isinstance(evidence, dict):
        return rows
    half = "confirmation half" if evidence.get("holdout") is not None else "all examples, no holdout"
    for key, label in (("chosen", "chosen"), ("naive", "naive pick (best raw by selection)")):
        entry = evidence.get(key) or {}
        if entry.get("confirmation_score") is not None:
            rows.append((f"{label}, {half}", f"{entry['confirmation_score']:.4f} (step {entry['step']})"))
    interval = (evidence.get("intervals") or {}).get("avg_minus_raw")
    if interval:
        rows.append(
            (
                "avg − raw, 95% CI",
                f"{interval['estimate']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]",
            )
        )
    return rows


class TensorBoardSink:
    """Write stability records as TensorBoard scalars, one run per variant.

    Under ``log_dir`` the sink keeps four runs, each its own ``SummaryWriter`` created at its first
    point: ``raw``, ``avg`` and ``ens`` hold ``stability/<task>/{score,mtv,is}`` (``<task>`` includes
    ``mean``), and the avg and ens runs also ``stability/<task>/{mtv,is}_ratio``, their steadiness as a
    fraction of raw's over the same trailing horizon. The same tag in three runs is what makes
    TensorBoard's default Time Series tab draw raw, avg and ens on one card, in three colours, with a
    named value table. ``best`` holds ``stability/best/score`` and ``stability/best/step`` at each step
    where the selected best model changed, and ``best.json`` as text (tag ``stability/best``).

    A Custom Scalars layout (:func:`custom_scalars_layout`: per task, one chart per metric) is written
    once, into ``layout_writer`` when one is given (Lightning's ``TensorBoardLogger.experiment``, so
    the layout sits with the logger's own run), else into the ``raw`` run.

    Resuming: pass ``purge_step=S + 1`` when the run resumes from a checkpoint at step ``S``. Every run's
    writer then starts its event file with a ``SessionLog.START`` at that step, and TensorBoard's reader
    (``purge_orphaned_data=True``, its default) drops that run's points at or after it: the abandoned
    trajectory's points vanish from every chart while everything up to ``S`` stays. The old event
    files stay on disk. The resumed run must write into the same ``log_dir``.

    Example::

        sink = TensorBoardSink("runs/exp1/stability", task_names=["hellaswag", "arc_easy"])
        sink.write(500, records)        # the records of step 500, incl. task "mean"
        sink.best_changed(500, best, export_dir)
        sink.close()
        # tensorboard --logdir runs/exp1   -> runs stability/raw, stability/avg, stability/ens, stability/best
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        task_names: Sequence[str],
        purge_step: int | None = None,
        layout_writer: Any = None,
        drift: bool = True,
    ) -> None:
        if log_dir is None or not str(log_dir):
            raise ValueError(f"log_dir must be a directory path, got {log_dir!r}")
        if purge_step is not None:
            purge_step = require_int("purge_step", purge_step, 0, optional=True)
        if layout_writer is not None and not callable(getattr(layout_writer, "add_custom_scalars", None)):
            raise ValueError(
                f"layout_writer must have a callable add_custom_scalars(), got {type(layout_writer).__name__}"
            )
        self.log_dir = os.fspath(log_dir)
        self.task_names = layout_task_names(task_names)
        self.purge_step = purge_step
        self._layout_writer = layout_writer
        self._drift_chart = drift
        self._writers: dict[str, Any] = {}
        self._layout_written = False
        self._closed = False

    def run_dir(self, run: str) -> Path:
        """The directory of one of the sink's runs (``raw``, ``avg``, ``ens`` or ``best``)."""
        return Path(self.log_dir) / run

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            # Imported here so that importing the sinks package does not pull in tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir(run)), purge_step=self.purge_step)
            self._writers[run] = writer
        return writer

    def write(self, step: int, records: list[dict]) -> None:
        """Log every run's scalars of ``records`` at ``global_step=step`` and flush."""
        self._check_open()
        for record in records:
            if "step" in record and record["step"] != step:
                raise ValueError(
                    f"records must all be of step {step}, got a record of step {record['step']!r}"
                )
        runs = run_scalars(records)
        if not self._layout_written:
            # The custom-scalars plugin reads one layout per run: written exactly once.
            target = self._layout_writer if self._layout_writer is not None else self._writer("raw")
            target.add_custom_scalars(custom_scalars_layout(self.task_names, drift=self._drift_chart))
            self._layout_written = True
        for variant, scalars in runs.items():
            writer = self._writer(variant)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step)
            # Once per snapshot, so flushing every write is cheap and shows results at once rather
            # than after SummaryWriter's flush_secs (120 s by default).
            writer.flush()

    def drift(self, step: int, values: dict) -> None:
        """How far the weights moved at snapshot ``step``: ``stability/drift/{previous,average}`` in the
        ``raw`` run (it is the raw weights that moved); a value that is None is not logged."""
        self._check_open()
        writer = self._writer("raw")
        for name in ("previous", "average"):
            if values.get(name) is not None:
                writer.add_scalar(f"{DRIFT_PREFIX}/{name}", float(values[name]), global_step=step)
        writer.flush()

    def best_changed(self, step: int, best: dict, export: Path | None) -> None:
        """The selected best model changed at ``step``: its score and step, and ``best.json`` as text."""
        self._check_open()
        writer = self._writer(BEST_RUN)
        if best.get("score") is not None:
            writer.add_scalar(f"{SCALAR_PREFIX}/best/score", float(best["score"]), global_step=step)
        writer.add_scalar(f"{SCALAR_PREFIX}/best/step", float(best["step"]), global_step=step)
        writer.add_text(BEST_TEXT_TAG, best_markdown(best, export), global_step=step)
        writer.flush()

    def close(self) -> None:
        """Close the sink's writers (a layout writer handed over is the caller's). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TensorBoardSink used after close()")


__all__ = ["TensorBoardSink", "custom_scalars_layout", "run_scalars", "run_tag"]
