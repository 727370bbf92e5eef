"""What both framework callbacks share, free of any framework: settings, the monitor's lifecycle around
one training run, the snapshot-step guard and the best-model accessors.

A framework adapter subclasses its framework's callback class and :class:`StabilityCallbackBase`; it
only translates its framework's hooks, steps and loggers into the calls below.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.partitioned_models import refuse_partitioned
from checkpoint_stability.selection import best_model_path, load_best, read_best
from checkpoint_stability.sinks import Sink
from checkpoint_stability.tasks.base import Task

logger = logging.getLogger(__name__)

RUN_DIRECTORY_NAME = "stability"
CALLBACK_NAME = "StabilityCallback"


class StabilityCallbackBase:
    """The framework-free half of a ``StabilityCallback``: one :class:`StabilityMonitor` per training run.

    The adapter builds ``self.monitor`` (with its sinks in ``self._sinks``) when training starts, then
    calls :meth:`_start` once the training checkpoint's state and step are known, :meth:`_snapshot`
    after every optimizer step, and :meth:`_close` (or :meth:`_abandon` on an exception) at the end.
    """

    def __init__(self, tasks: Sequence[Task] | None = None, **settings):
        self.config = StabilityConfig.from_settings(CALLBACK_NAME, settings)
        if tasks is not None:
            tasks = list(tasks) if isinstance(tasks, Sequence) and not isinstance(tasks, str) else tasks
            # Checked against the settings (names, select_metric, mean_prob) now, not when training starts.
            tasks = StabilityMonitor.check_tasks(tasks, self.config)
        self.tasks: list[Task] | None = tasks
        self.monitor: StabilityMonitor | None = None
        """The monitor of the current (or last) training run; built when training starts."""
        self._sinks: list[Sink] = []
        self._running = False
        self._last_snapshot_step: int | None = None
        self._latest_records: list[dict] = []
        super().__init__()

    # ------------------------------------------------------------------ public

    @property
    def latest_records(self) -> list[dict]:
        """The records of the latest snapshot (every rank has the same)."""
        return list(self._latest_records)

    @property
    def best(self) -> dict | None:
        """What ``best.json`` says: the best model so far under the ``select`` policy, or None.

        Before this callback has run, read from ``dirpath=`` when it was given (a run made by another
        process), else None."""
        if self.monitor is None:
            return read_best(self.config.dirpath) if self.config.dirpath is not None else None
        return self.monitor.best

    @property
    def best_model_path(self) -> Path | None:
        """The directory of the exported best model, or None (read from ``dirpath=`` before a run, as
        :attr:`best` is).

        With the default ``select="avg"`` this is a window average, which none of the framework's own
        checkpoints holds: ``best.json``'s ``steps`` names the snapshots it averages.
        """
        if self.monitor is None:
            return best_model_path(self.config.dirpath) if self.config.dirpath is not None else None
        return self.monitor.best_model_path

    def load_best(self, model: torch.nn.Module, *, strict: bool = True) -> dict:
        """Load the exported best model (the one ``best.json`` names) into ``model``; returns ``best``.

        ``model`` is a module like the trained one, or the exported model inside it (Lightning's
        ``model_attribute``, e.g. the wrapped Hugging Face model). Works before this callback has run
        when ``dirpath=`` names a run directory (a finished run, or one another process is writing):
        ``StabilityCallback(dirpath="runs/exp/stability").load_best(model)``, the same as
        ``checkpoint_stability.load_best("runs/exp/stability", model)``.
        """
        if self.monitor is not None:
            return self.monitor.load_best(model, strict=strict)
        if self.config.dirpath is None:
            raise FileNotFoundError(
                "this callback has not run and has no dirpath=: pass dirpath= naming the run directory, "
                "or call checkpoint_stability.load_best(run_dir, model)"
            )
        return load_best(self.config.dirpath, model, strict=strict, prefix=self._load_prefix(model))

    def _load_prefix(self, model: torch.nn.Module) -> str:
        """The state-dict prefix of the exported model inside ``model`` (Lightning's wrapped model)."""
        return ""

    # ------------------------------------------------------------------ for the adapters

    @property
    def _monitor(self) -> StabilityMonitor:
        """The monitor of the run in progress (a ``RuntimeError`` before the adapter built it)."""
        if self.monitor is None:
            raise RuntimeError(f"{CALLBACK_NAME}: no training run has started")
        return self.monitor

    def _tasks_here(self, default: Callable[[], list[Task]]) -> list[Task]:
        """The tasks this training process evaluates: none with ``evaluation="background"`` (the evaluator
        process runs them; not even a default task is built), else the given ones or ``default()``."""
        if self.config.evaluation == "background":
            return []
        return list(self.tasks) if self.tasks is not None else default()

    def _configured_dirpath(self, default_parent: str | os.PathLike) -> Path:
        """``dirpath=`` if given, else ``<default_parent>/stability``; absolute, so the path saved in a
        checkpoint still names it from another working directory."""
        chosen = self.config.dirpath
        if chosen is None:
            chosen = Path(default_parent) / RUN_DIRECTORY_NAME
        return Path(os.path.abspath(chosen))

    def _start(
        self,
        step: int,
        *,
        resume_step: int | None,
        model: torch.nn.Module | None,
        restored_state: dict | None,
    ) -> bool:
        """Training starts at ``step``: restore the state saved in the training checkpoint (its run
        directory wins), open under the ``on_error`` policy, and give sinks with a ``preload(records)``
        method (W&B charts) the history the run continues. True if the run directory is open; with
        ``on_error="warn"`` an unusable one is warned about and each snapshot tries again. A DeepSpeed
        ZeRO-3 set-up that cannot be snapshotted (NVMe offload, ZeRO++ hpZ, MiCS) raises
        :class:`~checkpoint_stability.partitioned_models.PartitionedModelError`.
        Collective."""
        monitor = self._monitor
        if model is not None:
            # A configuration that cannot be snapshotted stops training now, whatever on_error says.
            refuse_partitioned(model)
        self._last_snapshot_step = step
        self._running = True
        try:
            if restored_state:
                monitor.load_state_dict(restored_state)
            opened = monitor.try_open(resume_step=resume_step, model=model)
        except BaseException:
            self._running = False
            raise
        if opened and monitor.runtime.is_main and monitor.history is not None:
            records, window = monitor.history.records(), monitor.config.window
            # The live series only: raw over one snapshot, avg and ens over the configured window.
            series = [r for r in records if r["window"] == (1 if r["variant"] == "raw" else window)]
            for sink in monitor.sinks:
                preload = getattr(sink, "preload", None)
                if callable(preload):
                    preload(series)
        return opened

    def _snapshot(self, model: Any, step: int) -> None:
        """After an optimizer step: snapshot and evaluate when ``step`` is a snapshot step not taken yet
        (under gradient accumulation several hooks can see one step)."""
        if not self._running or step == self._last_snapshot_step or not self._monitor.should_snapshot(step):
            return
        self._last_snapshot_step = step
        self._latest_records = self._monitor.on_snapshot(model, step)

    def _close(self) -> None:
        """The end of a training run: finish writes, export (``tasks=[]``), close the sinks. Collective."""
        if not self._running:
            return
        self._running = False
        try:
            self._monitor.close()
        finally:
            self._close_sinks()

    def _abandon(self) -> None:
        """An exception ends the run: finish the snapshot write in flight and release, without any
        collective (another rank may be gone) and without exporting."""
        if not self._running:
            return
        self._running = False
        try:
            self._monitor.abandon()
        finally:
            self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as error:
                logger.warning("%s: closing %s failed: %r", CALLBACK_NAME, type(sink).__name__, error)
