"""BackgroundEvaluator: evaluation off the training path, following a live run directory.

With ``evaluation="background"`` the training process only snapshots into ``buffer/`` (and says in
``run.json`` how it is configured, and when it has ended). This evaluator, in another process (on
another core, device or node that sees the run directory), takes every new snapshot in step order and
runs on it exactly what an inline run runs — the same :class:`StabilityMonitor` pipeline, fed the
buffered file instead of the live model: raw, its own window average (read from the files, the same
additions and subtractions as inline, so bit-identical on CPU), the ensemble from cached outputs,
MTV/IS, the history and examples, TensorBoard and W&B, selection, evidence and export. After each
snapshot it writes ``evaluator.json`` (:mod:`checkpoint_stability.evaluator_state`).

Crash-safe by construction: a restart reopens the run at the last step acknowledged in
``evaluator.json``, dropping anything newer a kill left half-written (as an inline resume does), so
no record is duplicated or missed. A trainer that resumes from an earlier step (a new ``generation``
in ``run.json``) makes the evaluator drop what it recorded after that step. A snapshot the trainer
had to drop before it was evaluated (``max_pending``) becomes an explicit error line in the history.

Example::

    from checkpoint_stability.evaluator import BackgroundEvaluator

    evaluator = BackgroundEvaluator("runs/exp/stability", tasks, model=build_model())
    evaluator.run(timeout=600)   # until training has ended and every snapshot is evaluated
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_stability.buffer import CorruptSnapshotError, SnapshotEntry
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.evaluator_state import EvaluatorState, read_evaluator_state, write_evaluator_state
from checkpoint_stability.followed_buffer import FollowedBuffer
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.run_directory import read_run_record
from checkpoint_stability.sinks import Sink
from checkpoint_stability.state_dicts import (
    CapturedState,
    CopiedStateDictError,
    check_writable,
    live_tensors,
    write_into,
)
from checkpoint_stability.storage.json_files import read_json_object
from checkpoint_stability.storage.run_lock import LOCK_FILE
from checkpoint_stability.tasks.base import Task

logger = logging.getLogger(__name__)


TRAINER_GRACE_SECONDS = 5.0
"""How long the training process must stay gone (its lock let go, or its process dead on this host)
before the evaluator stops: a trainer that crashes and is restarted at once is followed on."""


class NotBackgroundRunError(ValueError):
    """The run directory was not written by a run with ``evaluation="background"``."""


class ModelMismatchError(ValueError):
    """The evaluator's model is not the architecture the snapshots were taken of."""


@dataclass(frozen=True)
class _FollowState:
    """What the deciding rank remembers between looks at the run directory."""

    consumed: int | None
    generation: int
    idle_since: float
    gone_since: float | None = None


@dataclass(frozen=True)
class FollowResult:
    """What one :meth:`BackgroundEvaluator.run` did."""

    evaluated: list[int]
    """Steps evaluated by this call, in order."""
    skipped: list[int]
    """Steps the trainer dropped before they were evaluated (``max_pending``), recorded as gaps."""
    closed: bool
    """Whether training had ended (``run.json`` closed) when the evaluator stopped."""
    lags: list[float]
    """Seconds from each snapshot's file being committed to its records being written."""


class BackgroundEvaluator:
    """Evaluate a background-evaluated run's snapshots as they arrive; see the module docstring.

    ``tasks``: the tasks to run (as the inline ``tasks``). ``model``: a module of the trained
    architecture (or a function building one); each snapshot's weights are copied into it.
    ``sinks``: extra destinations for the records. Settings come from the training side's
    ``run.json``; ``console`` overrides whether per-snapshot lines are printed here.

    Example (the training side, then its evaluator; in use they run at the same time)::

        >>> import tempfile, torch
        >>> from checkpoint_stability import BackgroundEvaluator, FunctionTask, StabilityMonitor
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> task = FunctionTask("toy", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())
        >>> model = torch.nn.Linear(4, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with StabilityMonitor(dirpath=d, window=2, every_n_steps=1, evaluation="background",
        ...                           console=False) as trainer:
        ...         for step in (1, 2, 3):
        ...             _ = trainer.step(model, step)
        ...     result = BackgroundEvaluator(d, [task], torch.nn.Linear(4, 2), console=False).run()
        >>> result.evaluated, result.closed
        ([1, 2, 3], True)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tasks: Sequence[Task],
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        *,
        sinks: Sequence[Sink] = (),
        console: bool | None = None,
        printer: Callable[[str], None] | None = None,
        export_prefix: str = "",
        processing_class=None,
        poll_interval: float = 1.0,
    ):
        self.run_dir = Path(run_dir)
        record = read_run_record(self.run_dir)
        if (
            record is None
            or record.get("evaluation") != "background"
            or not isinstance(record.get("config"), dict)
        ):
            raise NotBackgroundRunError(
                f"{self.run_dir} has no run.json of a run with evaluation='background' (start training with "
                "StabilityCallback(..., evaluation='background') or StabilityMonitor(..., "
                "evaluation='background'), then follow its run directory)"
            )
        self.shards = 0
        self.distributed_rank: int | None = None
        """Under torch.distributed (a sharded run followed by as many ranks as trained it): this rank."""
        if record.get("sharded"):
            world = int(record.get("world_size") or 1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_world_size() != world:
                    raise ValueError(
                        f"{self.run_dir} was trained on {world} ranks; an evaluator under torch.distributed "
                        f"must run on as many (it has {torch.distributed.get_world_size()}), each following "
                        "its own shards, or run as one process, which puts the full tensors together"
                    )
                self.distributed_rank = torch.distributed.get_rank()
            else:
                self.shards = world
        settings = {k: v for k, v in record["config"].items() if k in StabilityConfig.field_names()}
        settings.pop("resum_every", None)
        settings["dirpath"] = str(self.run_dir)
        if console is not None:
            settings["console"] = console
        self.config = StabilityConfig(**settings)
        self.tasks = list(tasks)
        self.model = model if isinstance(model, torch.nn.Module) else model()
        self.sinks = list(sinks)
        self.printer = printer
        self.export_prefix = export_prefix
        self.processing_class = processing_class
        self.poll_interval = float(poll_interval)

    def run(self, *, timeout: float | None = None) -> FollowResult:
        """Evaluate every snapshot not evaluated yet, in step order, and keep following until training has
        ended and every snapshot is evaluated, or nothing new arrived for ``timeout`` seconds (None:
        wait as long as training runs), or the training process is gone (same host only)."""
        state = read_evaluator_state(self.run_dir) or EvaluatorState()
        record = read_run_record(self.run_dir) or {}
        consumed = self._after_trainer_resume(state, record)
        monitor = StabilityMonitor(
            self.tasks,
            self.config,
            sinks=self.sinks,
            export_prefix=self.export_prefix,
            processing_class=self.processing_class,
            printer=self.printer,
            follower=True,
        )
        monitor.follow_steps = self._window_at(state, consumed)
        monitor.follow_shards = self.shards
        # Nothing acknowledged yet: drop whatever an evaluator killed before its first ack wrote.
        monitor.open(resume_step=consumed if consumed is not None else -1, model=self.model)
        runtime = monitor.runtime
        evaluated: list[int] = []
        skipped: list[int] = []
        lags: list[float] = []
        follow = _FollowState(consumed, record.get("generation", 0), time.monotonic())
        finished = False
        try:
            while True:
                # Rank 0 decides (one reading of run.json and of its manifest); under torch.distributed
                # every rank then does the same, collectively.
                decision = self._decide(monitor, follow, timeout) if runtime.is_main else None
                decision = runtime.broadcast_object(decision)
                follow = decision["follow"]
                if decision["resume"] is not None:
                    # Its window at that step: the snapshots up to it still on disk.
                    monitor.follow_steps = self._window_at(EvaluatorState(), follow.consumed)
                    monitor.resume(decision["resume"])
                for step in decision["gaps"]:
                    if runtime.is_main:
                        self._record_gap(monitor, step)
                        self._acknowledge(monitor, step, follow.generation)
                    skipped.append(step)
                if decision["step"] is not None:
                    step = decision["step"]
                    followed = monitor.window.files
                    assert isinstance(followed, FollowedBuffer)
                    entry = followed.entry_at(step)
                    self._evaluate(monitor, followed, entry, step)
                    if runtime.is_main:
                        self._acknowledge(monitor, step, follow.generation)
                    evaluated.append(step)
                    if entry is not None:
                        lags.append(max(0.0, time.time() - entry.time))
                    continue
                if decision["stop"] is not None:
                    finished = True
                    return FollowResult(evaluated, skipped, decision["stop"] == "closed", lags)
                time.sleep(self.poll_interval)
        finally:
            # Ended as planned: the report and the summary, as an inline close. Interrupted: only let the
            # run directory go (a restart goes on from evaluator.json).
            if finished:
                monitor.close()
            else:
                monitor.abandon()

    def _decide(self, monitor: StabilityMonitor, follow: _FollowState, timeout: float | None) -> dict:
        """Rank 0: what to do next — follow a trainer that resumed, record the gaps it left, evaluate the
        next snapshot, stop, or wait."""
        decision: dict = {"resume": None, "gaps": [], "step": None, "stop": None}
        record = read_run_record(self.run_dir) or {}
        consumed, generation = follow.consumed, follow.generation
        if record.get("generation", 0) != generation:
            generation = record.get("generation", 0)
            resumed = record.get("resumed_from")
            if isinstance(resumed, int) and (consumed is None or resumed < consumed):
                logger.warning("training resumed from step %d: dropping what was evaluated after it", resumed)
                consumed = resumed if resumed >= 0 else None
                decision["resume"] = resumed
        followed = monitor.window.files
        assert isinstance(followed, FollowedBuffer)
        entries, gaps = followed.unconsumed(after=consumed)
        first = entries[0].step if entries else None
        decision["gaps"] = [step for step in gaps if first is None or step < first]
        if decision["gaps"]:
            consumed = max([consumed or 0, *decision["gaps"]])
        idle_since, gone_since = follow.idle_since, follow.gone_since
        if first is not None:
            decision["step"] = first
            consumed, idle_since = first, time.monotonic()
        elif record.get("closed"):
            decision["stop"] = "closed"
        else:
            if self._trainer_alive():
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            if gone_since is not None and time.monotonic() - gone_since >= TRAINER_GRACE_SECONDS:
                logger.warning(
                    "the training process of %s is gone and the run is not closed: everything buffered is "
                    "evaluated; stopping",
                    self.run_dir,
                )
                decision["stop"] = "gone"
            elif timeout is not None and time.monotonic() - idle_since > timeout:
                decision["stop"] = "timeout"
        decision["follow"] = _FollowState(consumed, generation, idle_since, gone_since)
        return decision

    # ------------------------------------------------------------------ steps

    def _evaluate(
        self, monitor: StabilityMonitor, followed: FollowedBuffer, entry: SnapshotEntry | None, step: int
    ) -> None:
        """One snapshot: its file into the model, then the inline pipeline on it. Under torch.distributed
        every rank loads its own shard file; if any rank cannot, every rank skips the step together."""
        captured, error = None, None
        try:
            if entry is None:
                raise CorruptSnapshotError(step, f"step {step} is not in {followed.directory}")
            captured = followed.load(entry)
        except CorruptSnapshotError as caught:
            error = caught
        if monitor.runtime.any_rank(error is not None):
            error = error or CorruptSnapshotError(step, f"step {step} could not be read on another rank")
            monitor.faults.report("snapshot", error, step=step, agreed=True)
            return
        assert captured is not None and entry is not None
        live = live_tensors(self.model)
        try:
            check_writable(self.model, live)
        except CopiedStateDictError as error:
            raise ModelMismatchError(f"the evaluator's model cannot take the snapshots in: {error}") from None
        try:
            with torch.no_grad():
                write_into(live, captured)
        except (KeyError, ValueError, RuntimeError) as error:
            detail = error.args[0] if error.args else error
            raise ModelMismatchError(
                f"the snapshot of step {entry.step} ({followed.directory / entry.file}) does not fit the "
                f"evaluator's model: {detail}; the model must be the module that was trained"
            ) from error
        # In the model's order, as an inline snapshot is: the average's rolling exact re-sum walks its
        # tensors in the order it first saw them, so another order would round other slices first.
        ordered = {name: captured.tensors[name] for name in live if name in captured.tensors}
        ordered.update((name, tensor) for name, tensor in captured.tensors.items() if name not in ordered)
        followed.stage(entry.step, CapturedState(ordered, dict(captured.aliases)))
        monitor.on_snapshot(self.model, entry.step)

    def _record_gap(self, monitor: StabilityMonitor, step: int) -> None:
        message = (
            f"snapshot {step} was dropped by the training side before it was evaluated: the evaluator was "
            f"more than max_pending={self.config.pending_bound} snapshots behind"
        )
        logger.warning("%s", message)
        if monitor.history is not None:
            monitor.history.append_error(step, "skipped", message)

    def _acknowledge(self, monitor: StabilityMonitor, consumed: int, generation: int) -> None:
        window = monitor.window.steps
        state = EvaluatorState(
            consumed=consumed,
            window=window,
            needed_from=window[0] if window else consumed + 1,
            generation=generation if isinstance(generation, int) else 0,
        )
        write_evaluator_state(self.run_dir, state)

    def _after_trainer_resume(self, state: EvaluatorState, record: dict) -> int | None:
        """Where to go on from: the last acknowledged step, or the step training resumed from if that is
        earlier and this evaluator has not followed that resume yet."""
        consumed = state.consumed
        resumed = record.get("resumed_from")
        followed = record.get("generation", 0) == state.generation
        if not followed and isinstance(resumed, int) and consumed is not None and resumed < consumed:
            consumed = resumed if resumed >= 0 else None
        return consumed

    def _window_at(self, state: EvaluatorState, consumed: int | None) -> list[int]:
        """The evaluator's window when it goes on after ``consumed``: the acknowledged one, or, when it
        goes back (training resumed from an earlier step), the last ``window`` snapshots up to that step
        still on disk: the trainer's own window there, as an inline resume keeps."""
        if consumed is None:
            return []
        if state.consumed == consumed:
            return list(state.window)
        on_disk = [
            entry.step
            for entry in FollowedBuffer(self._leading_buffer(), self.config.window).unconsumed(None)[0]
        ]
        return [step for step in on_disk if step <= consumed][-self.config.window :]

    def _leading_buffer(self) -> Path:
        """The buffer directory whose manifest this process reads: its rank's under torch.distributed,
        rank 0's for a sharded run followed by one process, else the buffer itself."""
        buffer = self.run_dir / "buffer"
        if self.distributed_rank is not None:
            return buffer / f"rank-{self.distributed_rank}"
        return buffer / "rank-0" if self.shards else buffer

    def _trainer_alive(self) -> bool:
        """Whether the training process still holds its lock, as far as this host can tell: a holder on
        another host is assumed alive (``timeout`` ends the wait there)."""
        try:
            holder = read_json_object(self.run_dir / LOCK_FILE)
        except (OSError, ValueError):
            return False  # released: the trainer closed (or never started)
        if holder.get("host") != socket.gethostname():
            return True
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def follow(
    run_dir: str | os.PathLike,
    tasks: Sequence[Task],
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    *,
    timeout: float | None = None,
    **options,
) -> FollowResult:
    """:class:`BackgroundEvaluator` ``(run_dir, tasks, model, **options).run(timeout=timeout)``."""
    return BackgroundEvaluator(run_dir, tasks, model, **options).run(timeout=timeout)


__all__ = ["BackgroundEvaluator", "FollowResult", "ModelMismatchError", "NotBackgroundRunError", "follow"]
