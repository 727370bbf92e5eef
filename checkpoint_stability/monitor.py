"""StabilityMonitor: the per-snapshot pipeline, framework-free.

At every snapshot: copy the weights into the rolling buffer (written in the background), evaluate the
live model (``raw``), combine the window's cached outputs (``ens``, no forward pass), evaluate the
window average (``avg``, swapped in and out bit-exactly), compute live MTV and IS, and send the
records to the history and the sinks. Framework callbacks only translate their hooks into
``on_snapshot(model, step)``.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.best_export import BestExport
from checkpoint_stability.buffer import SnapshotBuffer, SnapshotError
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.diagnostics import WeightDrift
from checkpoint_stability.evaluation import SnapshotEvaluation
from checkpoint_stability.evaluator_state import needed_from
from checkpoint_stability.evidence import SelectionEvidence
from checkpoint_stability.faults import FaultPolicy, describe_error
from checkpoint_stability.followed_buffer import FollowedBuffer
from checkpoint_stability.fsdp1_shards import UnsupportedShardingError, unwrapped
from checkpoint_stability.history import History
from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.live_series import LiveSeries
from checkpoint_stability.partitioned_models import PartitionedModelError, refuse_partitioned
from checkpoint_stability.publishing import RecordPublisher
from checkpoint_stability.run_directory import ExistingRunError, RunDirectory, read_run_record
from checkpoint_stability.run_summary import run_summary_lines
from checkpoint_stability.runtime import Runtime, default_runtime
from checkpoint_stability.selection import BestModelSelector, load_best
from checkpoint_stability.sinks import Sink
from checkpoint_stability.state_dicts import (
    free_gathered_weights,
    is_sharded,
    live_tensors,
    parameter_names,
    shard_layout,
)
from checkpoint_stability.storage.export import ModelExporter
from checkpoint_stability.tasks.base import Task, TaskResult
from checkpoint_stability.validation import require_int
from checkpoint_stability.window import SnapshotWindow
from checkpoint_stability.zero3_partitions import zero3_module

logger = logging.getLogger(__name__)


class StabilityMonitor:
    """Evaluate a model, its window average and its window ensemble side by side during training.

    Call ``step(model, step)`` after every optimizer step (it snapshots every ``every_n_steps``), or
    ``on_snapshot(model, step)`` at the steps of your choosing. Everything lands under ``dirpath``:
    ``buffer/`` (the window's weights), ``history.jsonl``, ``examples/`` and ``tensorboard/``.

    A fault at run time (disk full, a task that raises, a corrupt snapshot) is logged, recorded as an
    error line in the history and skipped, unless ``on_error="raise"``.

    Example::

        >>> import tempfile, torch
        >>> from checkpoint_stability import FunctionTask, StabilityMonitor
        >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        >>> task = FunctionTask("toy", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())
        >>> model = torch.nn.Linear(8, 3)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with StabilityMonitor([task], dirpath=d, window=3, every_n_steps=5, console=False) as monitor:
        ...         for step in range(1, 21):
        ...             loss = torch.nn.functional.cross_entropy(model(x), y)
        ...             optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...             records = monitor.step(model, step)
        ...     sorted({(r["variant"], r["n_models"]) for r in records if r["task"] == "toy"})
        [('avg', 3), ('ens', 3), ('raw', 1)]

    As a context manager it closes when the block ends (exporting, writing the report) and, when the
    block raises, abandons instead: the write in flight finishes, the lock is released, nothing is
    exported.
    """

    def __init__(
        self,
        tasks: Sequence[Task] = (),
        config: StabilityConfig | None = None,
        *,
        runtime: Runtime | None = None,
        sinks: Sequence[Sink] = (),
        tensorboard_writer=None,
        export_prefix: str = "",
        processing_class: Any = None,
        printer: Callable[[str], None] | None = None,
        default_tasks: Sequence[str] = (),
        follower: bool = False,
        **settings,
    ):
        """``sinks``: extra destinations for the records (e.g. a framework logger); the caller owns them and
        closes them. ``tensorboard_writer``: a framework logger's ``SummaryWriter``; the variant runs
        then go to ``<its log_dir>/stability/{raw,avg,ens,best}`` and the Custom Scalars layout to it,
        instead of ``<dirpath>/tensorboard/{raw,avg,ens,best}``. ``runtime``: how to reach the other
        ranks (default: torch.distributed when a process group with more than one rank is up).
        ``export_prefix``: the state-dict prefix of the model to export inside the snapshotted module
        (``"model."`` for a wrapper holding it as ``self.model``; ``""``: all of it).
        ``processing_class``: a tokenizer saved beside Hugging Face exports (default: a task's).
        ``printer``: how the console lines and the end-of-run summary reach the user (default:
        ``print``; a framework callback passes its progress bar's). ``default_tasks``: names of tasks
        the caller built by default (``tasks=None``); one that fails at its first evaluation raises
        :class:`~checkpoint_stability.evaluation.DefaultTaskError` whatever ``on_error`` says.
        ``follower``: this monitor is a background evaluator's
        (:class:`~checkpoint_stability.evaluator.BackgroundEvaluator`): it reads the snapshots the
        training process buffered instead of writing them. Other keywords are ``StabilityConfig``
        settings."""
        if config is None:
            config = StabilityConfig(**settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.role = (
            "evaluator" if follower else ("trainer" if config.evaluation == "background" else "inline")
        )
        """``"inline"``: snapshots and evaluates; ``"trainer"``: the training side of background evaluation,
        which only snapshots; ``"evaluator"``: a background evaluator, which evaluates what was buffered."""
        if self.role == "trainer" and tasks:
            logger.info("evaluation='background': the tasks are run by the evaluator, not in this process")
            tasks = ()
        self.tasks: list[Task] = self.check_tasks(tasks, config)
        self.follow_steps: list[int] = []
        """Evaluator: its window's steps when it (re)opens (``evaluator.json``)."""
        self.follow_shards = 0
        """Evaluator of a sharded run in one process: how many rank directories to put together."""
        self._runtime = runtime
        self._extra_sinks = list(sinks)
        self._tensorboard_writer = tensorboard_writer
        self.export_prefix = export_prefix
        self.processing_class = processing_class
        self.printer = printer
        self.default_tasks = tuple(default_tasks)
        self._defaults_described = False
        self._opened = False
        self.dirpath: Path | None = None
        self.history: History | None = None
        self.selector: BestModelSelector | None = None
        self._publisher: RecordPublisher | None = None
        # Weakly: the policy must not keep its monitor alive (a dropped monitor releases its lock).
        self.faults = FaultPolicy(config.on_error, _weakly(weakref.WeakMethod(self._current_runtime)))
        self.window = SnapshotWindow(config, self.faults)
        self.evaluation = SnapshotEvaluation(config, self.window, self.faults, default_tasks=default_tasks)
        self.export = BestExport(config, self.window, self.faults)
        self._last_step: int | None = None
        self._storage_noted = False
        self._sharded = False
        self._drift_due: list[int] = []
        """Snapshot steps whose weight drift has not been published yet."""
        self._model: weakref.ReferenceType | None = None
        self._run_directory: RunDirectory | None = None
        self.series = LiveSeries(self.tasks, config, holdout=self.evaluation.holdout)
        self.evidence = SelectionEvidence(config, holdout=self.evaluation.holdout)

    @property
    def buffer(self) -> SnapshotBuffer | FollowedBuffer | None:
        """The on-disk window of snapshots (None until the run directory opens)."""
        return self.window.buffer

    @property
    def sinks(self) -> list[Sink]:
        """Where each snapshot's records go (rank 0, while open): the caller's sinks, then the monitor's."""
        return [] if self._publisher is None else list(self._publisher.sinks)

    @property
    def average(self) -> WindowAverage:
        """The running average of the window's snapshots."""
        return self.window.average

    @staticmethod
    def check_tasks(tasks: Sequence[Task], config: StabilityConfig) -> list[Task]:
        """Check tasks against the settings (``StabilityConfig.check_tasks``), so an adapter can refuse
        bad input at construction, before any monitor exists."""
        return config.check_tasks(tasks)

    # ------------------------------------------------------------------ lifecycle

    def _current_runtime(self) -> Runtime:
        return self.runtime

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = default_runtime()
        return self._runtime

    def open(
        self, dirpath=None, *, resume_step: int | None = None, model: torch.nn.Module | None = None
    ) -> None:
        """Open (or reopen) the run directory. Called by the first snapshot if not called before.

        ``resume_step``: the step training resumed from. Snapshots, history and example lines newer
        than it belong to an abandoned trajectory and are dropped; the TensorBoard run purges them.
        ``model``: the trained module, to tell whether its weights are sharded (FSDP2 / DTensor, FSDP1
        units with a sharding strategy, or DeepSpeed ZeRO-3 partitions), in which case every rank keeps the
        window of its own shards under ``buffer/rank-R/``. A ZeRO-3 set-up that cannot be snapshotted (NVMe
        offload, ZeRO++ hpZ, MiCS) is refused here
        (:class:`~checkpoint_stability.partitioned_models.PartitionedModelError`), and so is an FSDP1
        module handed over without its root unit.
        Without ``resume_step``, a directory holding another run's results raises
        :class:`~checkpoint_stability.run_directory.ExistingRunError` unless ``overwrite=True``.
        Collective: every rank calls it; rank 0 does the shared disk work and every rank raises if
        any rank fails.
        """
        if self._opened:
            raise RuntimeError(f"the monitor is already open at {self.dirpath}")
        chosen = dirpath if dirpath is not None else self.config.dirpath
        if chosen is None:
            raise ValueError("dirpath is not set: pass dirpath= to StabilityMonitor or to open()")
        self.dirpath = Path(chosen)
        if model is not None:
            refuse_partitioned(model)
            self._sharded = is_sharded(model)
        steps = [
            (self._open_shared, self.runtime.is_main),
            (self._open_buffer, self._owns_buffer),
            (self._open_series, self.runtime.is_main and self.role != "trainer"),
        ]
        for open_part, here in steps:
            error = None
            if here:
                try:
                    open_part(resume_step)
                except Exception as caught:
                    error = caught
            failure = self.faults.first_error_of_any_rank(error)
            if failure is not None:
                # Whatever failed, the lock and the files opened so far are let go: a failed open
                # must not leave the directory locked by this very process.
                self._release()
                raise failure
            if open_part == self._open_shared:
                # Rank 0 may have turned a fresh run into a replacement (overwrite=True): every rank's
                # buffer drops what that run left, as a resume from before the first step would.
                decided = self._run_directory.resume_step if self._run_directory is not None else None
                resume_step = self.runtime.broadcast_object(decided if self.runtime.is_main else None)
            if open_part == self._open_buffer and self._sharded:
                self.window.agree(self.runtime)
        if self.role == "trainer" and self.runtime.is_main and self.config.console:
            self._print(self._background_notice())
        if not self._defaults_described and self.runtime.is_main and self.config.console:
            self._defaults_described = True
            for task in self.tasks:
                if task.name in self.default_tasks:
                    # Built from the trainer's data, not by the user: say what it measures, on how much.
                    self._print(
                        f"[stability] default task {task.name!r}: {getattr(task, 'description', task)}"
                    )
        # Every rank decides the same way when an avg evaluation is due, so every rank needs the count.
        self._last_step, self.series.snapshots_taken = self.runtime.broadcast_object(
            (self._last_step, self.series.snapshots_taken)
        )
        self._opened = True

    @property
    def _run(self) -> Path:
        """The run directory (a ``RuntimeError`` before one is chosen)."""
        if self.dirpath is None:
            raise RuntimeError("the monitor has no run directory yet: call open() or take a snapshot")
        return self.dirpath

    @property
    def _owns_buffer(self) -> bool:
        """Rank 0 keeps the window of full weights; with sharded weights every rank keeps its shards'."""
        return self.runtime.is_main or self._sharded

    def try_open(self, *, resume_step: int | None = None, model: torch.nn.Module | None = None) -> bool:
        """:meth:`open` under the ``on_error`` policy; True if the run directory is open.

        A directory that cannot be used raises a ``RuntimeError`` with ``on_error="raise"``; with
        ``"warn"`` it is warned about once (rank 0), False is returned and each snapshot tries again.
        Another run's results without ``overwrite=True`` always raise :class:`ExistingRunError`.
        Collective.
        """
        try:
            self.open(resume_step=resume_step, model=model)
        except (ExistingRunError, PartitionedModelError, UnsupportedShardingError):
            # The user's choice to make (overwrite=, another dirpath, another parallelism), not a fault
            # to ride out.
            raise
        except Exception as error:
            where = self.config.dirpath
            message = f"checkpoint-stability cannot use the run directory {where}: {describe_error(error)}"
            if self.config.on_error == "raise":
                raise RuntimeError(f"{message} (on_error='raise')") from error
            if self.runtime.is_main:
                warnings.warn(
                    f"{message}. Training goes on without it: each snapshot tries again and logs the "
                    "failure. Pass dirpath= naming a writable directory",
                    stacklevel=2,
                )
            return False
        return True

    def resume(self, step: int) -> None:
        """Continue a run from ``step`` (e.g. after loading a training checkpoint)."""
        if self._opened:
            self._shutdown(final=False)
        self.open(self.dirpath or self.config.dirpath, resume_step=step)

    def close(self) -> None:
        """Finish the write in flight, close the monitor's own sinks; with no tasks, export the
        final window average as the run's model (there is no score to select on). Then write the
        report (``report=True``)."""
        if self._opened:
            self._shutdown(final=True)

    def abandon(self) -> None:
        """Training ended with an exception: finish the write in flight and release, with no collective
        (another rank may be gone) and no export. Reopen with ``open(resume_step=...)`` to continue."""
        if not self._opened:
            return
        if self.buffer is not None:
            try:
                self.buffer.close()
            except SnapshotError as error:
                logger.warning(
                    "checkpoint-stability: the last snapshot write failed: %s", describe_error(error)
                )
        self._drift_due = []  # no collective here: the drifts of the last snapshots are not published
        self._release()
        self._opened = False

    def __enter__(self) -> StabilityMonitor:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """``close()`` when the block ends normally; ``abandon()`` when it raises (the exception goes on:
        a later ``open(resume_step=...)`` continues the run)."""
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def state_dict(self) -> dict:
        """JSON-serialisable state for a training checkpoint: where the run lives and how far it got.

        Waits for the snapshot write in flight first, so a checkpoint saved after snapshot ``N`` implies
        that ``N`` is on disk (a failed write is reported as usual).
        """
        if self._opened and self.buffer is not None:
            self.window.wait()
        return {
            "dirpath": None if self.dirpath is None else str(self.dirpath),
            "last_step": self._last_step,
            "config": self.config.to_json(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved, before the monitor opens: the restored run directory wins
        over the configured one, so a resumed run continues in the same place."""
        if self._opened:
            raise RuntimeError("load_state_dict must be called before the monitor opens its run directory")
        if not isinstance(state, dict) or "dirpath" not in state:
            raise ValueError(f"not a StabilityMonitor state: {state!r:.200}")
        if state["dirpath"] is not None and Path(state["dirpath"]) != self.config.dirpath:
            if self.config.dirpath is not None:
                logger.info(
                    "continuing in the run directory %s saved in the checkpoint (not %s)",
                    state["dirpath"],
                    self.config.dirpath,
                )
            self.config = self.config.replace(dirpath=state["dirpath"])
        saved = state.get("config", {})
        changed = [
            k for k in ("window", "every_n_steps") if k in saved and saved[k] != getattr(self.config, k)
        ]
        if changed:
            logger.warning(
                "resuming with different settings than the checkpoint (%s); the history mixes both",
                ", ".join(f"{k}: {saved[k]} -> {getattr(self.config, k)}" for k in changed),
            )

    @property
    def best(self) -> dict | None:
        """What ``best.json`` says: the best model so far under the ``select`` policy."""
        return None if self.selector is None else self.selector.best

    @property
    def best_model_path(self) -> Path | None:
        """Directory of the exported best model (``model.safetensors`` inside), if any."""
        return None if self.selector is None else self.selector.best_path

    def load_best(self, model: torch.nn.Module, *, strict: bool = True, prefix: str | None = None) -> dict:
        """Load the exported best model (the one ``best.json`` names) into ``model``; returns ``best``.

        ``model`` is the exported model, or the module that was trained (which holds it under ``prefix``,
        default ``export_prefix``); tied entries a ``save_pretrained`` export leaves out are re-tied.
        """
        if self.best is None or self.selector is None:
            raise FileNotFoundError(
                "no best model has been exported yet (see best.json in the run directory)"
            )
        prefix = self.export_prefix if prefix is None else prefix
        return load_best(self.selector.root, model, strict=strict, prefix=prefix, best=self.best)

    # ------------------------------------------------------------------ the pipeline

    def should_snapshot(self, step: int) -> bool:
        return step > 0 and step % self.config.every_n_steps == 0

    def step(self, model: torch.nn.Module, step: int) -> list[dict] | None:
        """Snapshot and evaluate if ``step`` is a snapshot step; otherwise do nothing."""
        if not self.should_snapshot(step):
            return None
        return self.on_snapshot(model, step)

    def on_snapshot(self, model: torch.nn.Module, step: int) -> list[dict]:
        """Run the whole pipeline for the snapshot at optimizer step ``step``; returns its records.

        Collective under torch.distributed: every rank calls it at the same steps.
        """
        step = require_int("step", step, 0)
        # A model already snapshotted keeps its sharding: the checks (a state-dict walk on the training
        # thread) are made for a model seen for the first time only. They raise whatever on_error says:
        # an unsupported ZeRO-3 set-up or an FSDP1 module without its root cannot be snapshotted at all.
        if self._trained_model() is not model:
            refuse_partitioned(model)
            sharded = is_sharded(model)
            if self._opened and sharded != self._sharded:
                raise ValueError(
                    "the model's weights are sharded but the monitor was opened for full weights (or the "
                    "other way round): pass the model to open(model=...)"
                )
        live = live_tensors(model)
        if not self._ready(step, model):
            return []
        if self._trained_model() is not model:
            # Once per model, not per snapshot: a second state_dict walk on the training thread.
            self.window.parameter_names = parameter_names(model)
        self._model = weakref.ref(model)
        if self.role == "trainer" and self._sharded and self.window.buffer is not None:
            buffer = self.window.buffer
            if isinstance(buffer, SnapshotBuffer) and buffer.layout is None:
                # Once: how this rank's shards make up the full tensors, for an evaluator to put together.
                buffer.layout = shard_layout(model)
        captured = self.window.push(step, live) if self._owns_buffer else None
        if not self._storage_noted and self.window.storage_note is not None:
            # Once: what a snapshot costs in memory and on disk, and whether the disk holds the buffer.
            self._storage_noted = True
            if self.runtime.is_main and self.config.console:
                self._print(self.window.storage_note)
        self._last_step = step
        self.series.snapshots_taken += 1
        if self.role == "trainer":
            self.faults.raise_held()
            return []  # the evaluator does the rest, from the buffered files
        # The push waited for the previous write (with two snapshot images, for the one before it), so
        # the drifts measured before it are final.
        self._publish_drifts(settled=not self.window.overlapping, pending=step)

        results: dict[tuple[str, str], TaskResult] = {}
        if self.tasks:
            with isolated_evaluation(model):
                # FSDP1 keeps some units gathered after a forward pass without backward, ZeRO-3 every
                # parameter; the next one would not see new shards (a background evaluator's file, the
                # average's, then the restored live ones) without this. Local: frees memory, no collective.
                free_gathered_weights(model)
                results = self.evaluation.raw(self.tasks, model, self.runtime, step)
                free_gathered_weights(model)
                if self._average_due():
                    averaged, self.series.avg_models = self.evaluation.average(
                        self.tasks,
                        model,
                        live,
                        captured,
                        self.runtime,
                        sharded=self._sharded,
                        owns_window=self._owns_buffer,
                        step=step,
                    )
                    results.update(averaged)
                    free_gathered_weights(model)

        records: list[dict] = []
        if self.runtime.is_main:
            for task in self.tasks:
                if (task.name, "raw") in results:
                    self.series.add_raw(task.name, step, results[(task.name, "raw")])
                if self.config.ensemble is not None:
                    combined = self.evaluation.ensemble(task, self.series.ensemble_window(task.name), step)
                    if combined is not None:
                        results[(task.name, "ens")] = combined
            try:
                records = self.series.records(step, results)
            except Exception as error:
                self._fault("metrics", error, step=step)
            self.evidence.unavailable = set(self.series.unavailable)
            self.evidence.observe(records)
            if self._publisher is not None:
                self._publisher.publish(step, results, records, self._window_of)
        before = self._best_snapshot()
        self.export.consider(
            self.selector,
            self.runtime,
            sharded=self._sharded,
            step=step,
            records=records,
            model=model,
            live=live,
            ensemble_steps=self.series.ensemble_steps(self.tasks[0].name) if self.tasks else [],
        )
        self._update_evidence(step, before, results)
        self._announce_best(step, before)
        self._publish_drifts(settled=False)
        # Rank 0 holds the series reloaded after a resume, so its records are the ones every rank sees.
        records = self.runtime.broadcast_object(records)
        self.faults.raise_held()
        return records

    # ------------------------------------------------------------------ pipeline steps

    def _ready(self, step: int, model: torch.nn.Module) -> bool:
        """Open lazily and handle a step that is not after the last one (a resume); False on a fault."""
        if not self._opened and self.dirpath is None and self.config.dirpath is None:
            raise ValueError("dirpath is not set: pass dirpath= to StabilityMonitor or to open()")
        try:
            if not self._opened:
                self.open(model=model)
            if self._last_step is not None and step <= self._last_step:
                logger.warning(
                    "snapshot step %d is not after the last recorded step %d: treating it as a resume "
                    "from step %d and dropping what came after",
                    step,
                    self._last_step,
                    step - 1,
                )
                self.resume(step - 1)
        except (ExistingRunError, PartitionedModelError, UnsupportedShardingError):
            raise
        except Exception as error:
            self._fault("open", error, step=step, agreed=True)
            return False
        return True

    def _trained_model(self) -> torch.nn.Module | None:
        """The model the monitor last snapshotted, if it still exists (exports look it up when due)."""
        return None if self._model is None else self._model()

    def _exported_model(self) -> torch.nn.Module | None:
        """The module exports are of: the trained one, or the model an FSDP1 root or a DeepSpeed engine wraps
        (a Hugging Face model inside it is exported as a ``save_pretrained`` directory, as without them)."""
        model = self._trained_model()
        return None if model is None else unwrapped(zero3_module(model))

    def _average_due(self) -> bool:
        """Every ``average_every``-th snapshot of the run (the first one included)."""
        return (self.series.snapshots_taken - 1) % self.config.average_every == 0

    def _window_of(self, variant: str) -> int:
        return self.series.window_of(variant)

    def _fault(self, phase: str, error: BaseException, *, step: int | None, **where) -> None:
        """:meth:`FaultPolicy.report`, at the last step when the fault belongs to none."""
        self.faults.report(phase, error, step=step if step is not None else (self._last_step or 0), **where)

    # ------------------------------------------------------------------ state on disk

    def _open_shared(self, resume_step: int | None) -> None:
        """Rank 0: the run directory, its history and selection, the world-size record."""
        exporter = ModelExporter(
            _weakly(weakref.WeakMethod(self._exported_model)),
            prefix=self.export_prefix,
            processing_class=self.processing_class,
            tasks=tuple(self.tasks),
        )
        self._run_directory = RunDirectory(
            self._run,
            self.config,
            world_size=self.runtime.world_size,
            sharded=self._sharded,
            exporter=exporter,
            resume_step=resume_step,
            role=self.role,
        )
        self.history = self._run_directory.history if self.role != "trainer" else None
        self.selector = self._run_directory.selector
        self.faults.history = self.history

    def _open_series(self, resume_step: int | None) -> None:
        """Rank 0: the live series rebuilt from the history, and the sinks."""
        self._rebuild_series()
        if self.history is None:
            raise RuntimeError("the run directory's history is not open")
        # A resumed run hides the abandoned trajectory's points; a rerun without one hides the last run's.
        purge: int | None
        if resume_step is not None:
            purge = resume_step + 1
        else:
            purge = None if self._last_step is None else self._last_step + 1
        self._publisher = RecordPublisher(
            self.config,
            self.faults,
            self.history,
            self._run,
            self.tasks,
            extra_sinks=self._extra_sinks,
            tensorboard_writer=self._tensorboard_writer,
            purge_step=purge,
            printer=self.printer,
        )

    def _open_buffer(self, resume_step: int | None) -> None:
        """The window of this rank's weights (all of them on rank 0, or this rank's shards)."""
        directory = self._run / "buffer"
        if self._sharded:
            directory = directory / f"rank-{self.runtime.rank}"
        run = self._run
        if self.role == "trainer":
            record = read_run_record(run) or {}
            generation = record.get("generation") if isinstance(record.get("generation"), int) else None
            self.window.open(directory, resume_step, retain=lambda: needed_from(run, generation))
        elif self.role == "evaluator" and self.follow_shards:
            # A sharded run followed by one process: rank 0's directory leads, every rank's is read.
            shards = [directory / f"rank-{rank}" for rank in range(self.follow_shards)]
            self.window.open(shards[0], resume_step, follow=self.follow_steps, shards=shards)
        elif self.role == "evaluator":
            self.window.open(directory, resume_step, follow=self.follow_steps)
        else:
            self.window.open(directory, resume_step)

    def _shutdown(self, *, final: bool) -> None:
        self.window.close()
        if self._sharded:
            self.window.agree(self.runtime)
        if self.role == "trainer":
            if final and self.runtime.is_main and self._run_directory is not None:
                self._run_directory.mark_closed(self._last_step)
                if self.config.console:
                    self._print(
                        f"[stability] training ended at step {self._last_step} after "
                        f"{self.series.snapshots_taken} snapshots; the evaluator finishes what is buffered "
                        f"in {self._run / 'buffer'}"
                    )
            self._release()
            self._opened = False
            self.faults.raise_held()
            return
        self._publish_drifts(settled=True)
        if final:
            if not self.tasks:  # nothing to select on: the final window average is the run's model
                before = self._best_snapshot()
                self.export.final_average(
                    self.selector,
                    self.runtime,
                    sharded=self._sharded,
                    model=self._trained_model(),
                    step=self._last_step or 0,
                )
                self._announce_best(self._last_step or 0, before)
            if self.runtime.is_main and self._publisher is not None:
                report = self._publisher.run_ended(self._last_step)
                if self.config.console:
                    self._print_summary(report)
        self._release()
        self._opened = False
        self.faults.raise_held()

    def _publish_drifts(self, *, settled: bool, pending: int | None = None) -> None:
        """Send the weight drift of every snapshot whose write has finished to the history and sinks.

        ``settled``: every write before now has finished (right after a push, which waits for the
        previous write, or at close); only then can a sharded run gather its ranks' sums (a collective,
        so every rank must reach it at the same point) or a missing drift be given up on. Otherwise
        (end of a snapshot, full weights) a drift is sent as soon as its snapshot is committed, so it
        shows with the snapshot's scores when the average evaluation already waited for the write.
        ``pending``: a step just pushed, whose drift comes later.
        """
        if not self.config.drift or not self._owns_buffer:
            return
        due, self._drift_due = self._drift_due, []
        if self._sharded:
            if not settled:
                self._drift_due = due
            else:
                mine = [self.window.drift_of(step) for step in due]
                everyone = self.runtime.all_gather_object(mine)
                for index in range(len(due)):
                    parts = [drifts[index] for drifts in everyone]
                    if any(part is None for part in parts):
                        continue  # not measured on some rank (its write failed): no whole-model drift
                    try:
                        combined = WeightDrift.combine(parts)
                    except ValueError as error:
                        # Ranks disagree on the previous snapshot (a write failed on one rank only).
                        self._fault("drift", error, step=due[index])
                        continue
                    self._send_drift(combined)
        else:
            committed = set(self.window.steps)
            for step in due:
                drift = self.window.drift_of(step)
                if drift is not None and (settled or step in committed):
                    self._send_drift(drift)
                elif not settled:
                    self._drift_due.append(step)
        if pending is not None:
            self._drift_due.append(pending)

    def _send_drift(self, drift: WeightDrift) -> None:
        """Rank 0: one snapshot's drift to ``drift.jsonl``, TensorBoard and W&B."""
        if not self.runtime.is_main or self._publisher is None:
            return
        previous, average = drift.relative()
        line = {
            "previous_step": drift.previous_step,
            "previous": previous,
            "average": average,
            "n_models": drift.n_models,
        }
        self._publisher.drift(drift.step, line)

    def _background_notice(self) -> str:
        """What the training side of background evaluation tells the user when it opens."""
        files = self.config.window + self.config.pending_bound
        return (
            f"[stability] evaluation='background': this process only snapshots; evaluate with "
            f"`checkpoint-stability follow {self._run} --tasks MODULE:FUNCTION --model MODULE:FUNCTION`. "
            f"Disk: at most {files} snapshot files in {self._run / 'buffer'} (window {self.config.window} + "
            f"max_pending {self.config.pending_bound} for an evaluator that lags)"
        )

    def _update_evidence(self, step: int, before: dict | None, results: dict) -> None:
        """Rank 0: the new best's bootstrap intervals (from this step's per-example results), and the
        comparison with the naive pick and the final raw checkpoint, into ``best.json``."""
        best = self.best
        if not self.runtime.is_main or self.selector is None or best is None or best.get("score") is None:
            return
        try:
            if _identity(best) != _identity(before) and best["step"] == step:
                self.evidence.intervals(step, best["variant"], results, [task.name for task in self.tasks])
            self.selector.record_evidence(self.evidence.to_json(best))
        except Exception as error:
            self._fault("evidence", error, step=step)

    def _best_snapshot(self) -> dict | None:
        """A copy of what ``best.json`` says now (rank 0; None elsewhere), to tell when it changes."""
        return dict(self.best) if self.runtime.is_main and self.best is not None else None

    def _announce_best(self, step: int, before: dict | None) -> None:
        """Rank 0: tell the sinks (TensorBoard's best run, W&B's summary) when the best model changed."""
        best = self.best
        if not self.runtime.is_main or self._publisher is None or best is None:
            return
        if _identity(best) == _identity(before):  # evidence is rewritten every snapshot; the model is not
            if best != before:
                self._publisher.best_updated(dict(best))
            return
        self._publisher.best_changed(step, dict(best), self.best_model_path)

    def _print_summary(self, report: Path | None) -> None:
        """Rank 0, at the end of a run: where everything is, the chosen model, and what failed."""
        publisher = self._publisher
        lines = run_summary_lines(
            self._run,
            last_step=self._last_step,
            snapshots=self.series.snapshots_taken,
            window=self.config.window,
            evaluated=bool(self.tasks),
            best=self.best,
            select=self.config.select,
            report=report,
            tensorboard=publisher.tensorboard_dirs() if publisher is not None else [],
            faults=self.faults.summary(),
        )
        for line in lines:
            if not self._print(line):
                return

    def _print(self, line: str) -> bool:
        """Show ``line`` to the user through the printer (default ``print``); False if that failed: a
        closed stream must not turn a run into a failure."""
        try:
            if self.printer is not None:
                self.printer(line)
            else:
                print(line, flush=True)
        except Exception as error:
            logger.warning("could not print %r: %s", line[:60], describe_error(error))
            return False
        return True

    def _release(self) -> None:
        """Close what the monitor itself opened; the caller's sinks stay open (they are the caller's)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        self.window.release()  # a failed write was reported by _shutdown when it mattered
        if self._run_directory is not None:
            self._run_directory.release()
            self._run_directory = None

    def _rebuild_series(self) -> None:
        """Rank 0: rebuild the live score and output series from the history after (re)open."""
        if self.history is None:
            raise RuntimeError("the run directory's history is not open")
        last = self.series.rebuild(self.history, self.average.count)
        self.evidence.rebuild(
            self.history.records(task=self.config.select_metric),
            None if self.selector is None else self.selector.best,
            self.series.unavailable,
        )
        self._last_step = max([s for s in (last, *(self.window.steps[-1:])) if s is not None], default=None)


def _identity(best: dict | None) -> tuple | None:
    """What makes a best another model: its step, variant and export (not its evidence)."""
    return None if best is None else (best.get("step"), best.get("variant"), best.get("path"))


def _weakly(method: weakref.WeakMethod, gone: str | None = None):
    """``method`` of the monitor, called without a strong reference to it: the buffer and the selector
    must not keep their monitor alive, or a monitor dropped without ``close()`` would keep its run
    directory locked. Once the monitor is gone: None, or a ``RuntimeError(gone)``."""

    def call(*args):
        bound = method()
        if bound is None:
            if gone is not None:
                raise RuntimeError(gone)
            return None
        return bound(*args)

    return call
