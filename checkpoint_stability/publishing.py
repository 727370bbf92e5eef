"""Step 7 of a snapshot: its records and per-example results go to the history and to every sink, each
destination on its own, so one destination's trouble never costs the others; and the sinks' lifecycle
(the monitor's own built from the settings, an end-of-run hook, closing)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.history import History
from checkpoint_stability.sinks import ConsoleSink, ReportSink, Sink, TensorBoardSink
from checkpoint_stability.tasks.base import Task, TaskResult

logger = logging.getLogger(__name__)


class RecordPublisher:
    """Rank 0's outlets for one open run directory: the history and the sinks.

    ``extra_sinks`` are the caller's (a framework logger): written to, never closed here. The monitor's
    own sinks come from the settings: the TensorBoard runs ``raw``, ``avg``, ``ens`` and ``best`` (under
    ``<tensorboard_writer's log_dir>/stability`` when a framework logger's writer is given, with the
    Custom Scalars layout in that writer, else under ``<run>/tensorboard``; purged after ``purge_step``
    so that an abandoned trajectory's points disappear), the console line and the end-of-run report.

    Example::

        publisher = RecordPublisher(config, faults, history, run_dir, tasks, extra_sinks=[])
        publisher.publish(step, results, records, window_of)
        publisher.run_ended(step)   # once, when the run finished
        publisher.close()
    """

    def __init__(
        self,
        config: StabilityConfig,
        faults: FaultPolicy,
        history: History,
        run_dir: Path,
        tasks: Sequence[Task],
        *,
        extra_sinks: Sequence[Sink] = (),
        tensorboard_writer: Any = None,
        purge_step: int | None = None,
        printer: Callable[[str], None] | None = None,
    ):
        self.faults = faults
        self.history = history
        self.tasks = {task.name: task for task in tasks}
        self._own: list[Sink] = []
        names = list(self.tasks)
        if config.tensorboard:
            # The variant runs go beside the framework logger's own run when there is one
            # (<its log_dir>/stability/{raw,avg,ens,best}), with the layout in its writer; else
            # under the run directory.
            log_dir = run_dir / "tensorboard"
            if tensorboard_writer is not None:
                log_dir = Path(tensorboard_writer.get_logdir()) / "stability"
            self._own.append(
                TensorBoardSink(
                    log_dir,
                    task_names=names,
                    purge_step=purge_step,
                    layout_writer=tensorboard_writer,
                    drift=config.drift,
                )
            )
        if config.console:
            self._own.append(ConsoleSink(printer=printer))
        if config.report:
            self._own.append(ReportSink(run_dir))
        self.sinks: list[Sink] = [*extra_sinks, *self._own]

    def publish(
        self,
        step: int,
        results: dict[tuple[str, str], TaskResult],
        records: list[dict],
        window_of: Callable[[str], int],
    ) -> None:
        """Score lines first, then each result's examples line, then every sink; each on its own."""
        if records:
            try:
                self.history.append_many(records)
            except Exception as error:
                self.faults.report("history", error, step=step)
        for (task_name, variant), result in results.items():
            try:
                self.history.append_result(self.tasks[task_name], step, variant, window_of(variant), result)
            except Exception as error:
                self.faults.report("history", error, step=step, task=task_name, variant=variant)
        if not records:
            return
        for sink in self.sinks:
            try:
                sink.write(step, records)
            except Exception as error:
                self.faults.report("sink", error, step=step, task=type(sink).__name__)

    def drift(self, step: int, line: dict) -> None:
        """How far the weights moved at snapshot ``step`` (``line``: :meth:`History.append_drift`'s
        fields): to ``drift.jsonl``, then every sink with a ``drift`` hook (TensorBoard, W&B)."""
        try:
            self.history.append_drift(step, **line)
        except Exception as error:
            self.faults.report("history", error, step=step)
        for sink in self.sinks:
            hook = getattr(sink, "drift", None)
            if callable(hook):
                try:
                    hook(step, {"previous": line["previous"], "average": line["average"]})
                except Exception as error:
                    self.faults.report("sink", error, step=step, task=type(sink).__name__)

    def best_changed(self, step: int, best: dict, export: Path | None) -> None:
        """The selected best model changed at ``step``: every sink with a ``best_changed`` hook hears
        it (TensorBoard's ``best`` run, W&B's summary), each on its own."""
        for sink in self.sinks:
            hook = getattr(sink, "best_changed", None)
            if callable(hook):
                try:
                    hook(step, best, export)
                except Exception as error:
                    self.faults.report("sink", error, step=step, task=type(sink).__name__)

    def best_updated(self, best: dict) -> None:
        """The best model is the same, but what ``best.json`` says about it changed (its evidence):
        sinks with a ``best_updated`` hook keep the newest (W&B attaches it to the final artifact)."""
        for sink in self.sinks:
            hook = getattr(sink, "best_updated", None)
            if callable(hook):
                try:
                    hook(best)
                except Exception as error:
                    self.faults.report(
                        "sink", error, step=int(best.get("step") or 0), task=type(sink).__name__
                    )

    def run_ended(self, step: int | None) -> Path | None:
        """The sinks' end-of-run work (the report) once a run has finished with records; a failure is a
        fault like any other, never fatal. Returns the report's path, if one was written."""
        if not any(True for _ in self.history.records()):
            return None
        report = None
        for sink in self.sinks:
            run_ended = getattr(sink, "run_ended", None)
            if callable(run_ended):
                try:
                    written = run_ended()
                except Exception as error:
                    self.faults.report("report", error, step=step, task=type(sink).__name__)
                    continue
                if isinstance(written, Path) and report is None:
                    report = written
        return report

    def tensorboard_dirs(self) -> list[str]:
        """Where to point ``tensorboard --logdir`` (the summary says it): the runs' directory, or beside
        a framework's own run (``.../stability`` under its log directory) that run's parent, so the
        training loss shows with the stability runs."""
        found = []
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                directory = Path(sink.log_dir)
                shown = str(directory.parent if directory.name == "stability" else directory)
                if shown not in found:
                    found.append(shown)
        return found

    def close(self) -> None:
        """Close the monitor's own sinks (the caller's stay open: they are the caller's)."""
        for sink in self._own:
            try:
                sink.close()
            except Exception as error:
                logger.warning("closing %s failed: %r", type(sink).__name__, error)
        self._own, self.sinks = [], []
