"""Steps 3–5 of a snapshot: evaluate the live model (``raw``), the window average swapped into it
(``avg``), and combine the window's cached raw outputs (``ens``, no forward pass)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.ensemble import ensemble_result
from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.faults import FaultPolicy, describe_error
from checkpoint_stability.holdout import HoldoutScorer, HoldoutTooSmallError
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.state_dicts import CapturedState, capture_state, check_writable
from checkpoint_stability.tasks.base import Task, TaskResult
from checkpoint_stability.tasks.from_dataloader import default_task_fix
from checkpoint_stability.window import SnapshotWindow

Results = dict[tuple[str, str], TaskResult]
"""Results of one snapshot by (task name, variant)."""


class DefaultTaskError(CheckpointStabilityError, ValueError):
    """A task the caller built by default (``tasks=None``) failed at its first evaluation on every rank:
    a configuration error, raised whatever ``on_error`` says, with the cause and a fix."""


class SnapshotEvaluation:
    """Runs the tasks on the variants of one snapshot, collectively under ``torch.distributed``.

    Every rank evaluates every task (tasks split their examples across ranks), and a task that fails on
    any rank is skipped on all of them together (or raised, with ``on_error="raise"``), so no rank is
    left waiting in the next task's collectives. For ``avg`` the window average is written into the
    live tensors (broadcast from rank 0 for full weights; every rank its own shards when sharded), the
    tasks run, and the live weights are restored bit for bit, whatever happened in between.

    Example::

        evaluation = SnapshotEvaluation(config, window, faults)
        results = evaluation.raw(tasks, model, runtime, step=500)
        results |= evaluation.average(tasks, model, live, captured, runtime, sharded=False, step=500)
    """

    def __init__(
        self,
        config: StabilityConfig,
        window: SnapshotWindow,
        faults: FaultPolicy,
        *,
        default_tasks: Collection[str] = (),
    ):
        """``default_tasks``: names of tasks built by default (``tasks=None``) rather than given: one
        that fails at its first evaluation on every rank raises :class:`DefaultTaskError`."""
        self.config = config
        self.window = window
        self.faults = faults
        self._untried_defaults = set(default_tasks)
        self.holdout = HoldoutScorer(config.holdout) if config.holdout is not None else None
        """Splits each task's examples into the selection and confirmation halves (``holdout``)."""

    def task(
        self, task: Task, model: torch.nn.Module, runtime: Runtime, step: int, variant: str
    ) -> TaskResult | None:
        """One task's result, or None when it failed on any rank (reported once, on every rank)."""
        error, result = None, None
        try:
            result = task.evaluate(model)
            if not isinstance(result, TaskResult):
                raise TypeError(
                    f"task {task.name!r}: evaluate returned {type(result).__name__}, not a TaskResult"
                )
        except Exception as caught:
            error = caught
        first_of_default = task.name in self._untried_defaults
        self._untried_defaults.discard(task.name)
        # Agree before reporting: every rank skips (or raises) together, or the collectives of the
        # next task would hang on the ranks that carried on.
        if runtime.any_rank(error is not None):
            if first_of_default and not runtime.any_rank(error is None):
                raise DefaultTaskError(_default_task_failure(task, error)) from error
            if error is None:
                error = RuntimeError(f"task {task.name!r} failed on another rank")
            self.faults.report("evaluate", error, step=step, task=task.name, variant=variant, agreed=True)
            return None
        self._check_holdout(task, result)
        return result

    def _check_holdout(self, task: Task, result: TaskResult | None) -> None:
        """Raise :class:`HoldoutTooSmallError` (every rank sees the same examples, so every rank raises)
        when ``holdout`` leaves a half of this task with fewer than 2 examples: selection on one example
        is not selection. Ids that cannot be hashed leave confirmation unavailable for the task instead
        (the records say so); that is not a reason to stop training."""
        if result is None or self.holdout is None:
            return
        try:
            self.holdout.split(task.name, result.example_ids)
        except HoldoutTooSmallError:
            raise
        except ValueError:
            pass

    def raw(self, tasks: Sequence[Task], model: torch.nn.Module, runtime: Runtime, step: int) -> Results:
        """Every task on the live model."""
        results: Results = {}
        for task in tasks:
            result = self.task(task, model, runtime, step, "raw")
            if result is not None:
                results[(task.name, "raw")] = result
        return results

    def ensemble(self, task: Task, window: list[TaskResult], step: int) -> TaskResult | None:
        """The window's raw results of ``task`` combined (rank 0; no forward pass)."""
        if not window or self.config.ensemble is None:
            return None
        try:
            return ensemble_result(self.config.ensemble, task, window)
        except Exception as error:
            self.faults.report("ensemble", error, step=step, task=task.name, variant="ens")
            return None

    def average(
        self,
        tasks: Sequence[Task],
        model: torch.nn.Module,
        live: dict[str, torch.Tensor],
        captured: CapturedState | None,
        runtime: Runtime,
        *,
        sharded: bool,
        owns_window: bool,
        step: int,
    ) -> tuple[Results, int]:
        """Every task on the window average; returns the results and how many snapshots it averaged."""
        holds = 0
        if owns_window:
            self.window.wait()
            if sharded:
                self.window.agree(runtime)
            holds = self.window.average.count
            if holds and step not in self.window.steps:
                # The window lacks this very snapshot (its write failed, or its weights were not
                # finite): an average of the older ones only would pass for this step's, silently.
                self.faults.note(
                    step,
                    "average",
                    f"no avg at step {step}: its snapshot is not in the window (see the snapshot error "
                    f"above); the window holds steps {self.window.steps}",
                )
                holds = 0
        if not runtime.broadcast_object(holds):
            return {}, holds
        # The snapshot copy doubles as the backup when it holds the live values bit for bit.
        backup = captured if captured is not None and self.config.storage_dtype is None else None
        if backup is None:
            backup = capture_state(live)
        results: Results = {}
        try:
            error = None
            try:
                check_writable(model, live)  # every rank: the others take the average by broadcast
                if owns_window:
                    self.window.average.copy_into(live)
            except Exception as caught:
                error = caught
            if runtime.any_rank(error is not None):
                self.faults.report(
                    "average",
                    error or RuntimeError("swapping in the average failed on another rank"),
                    step=step,
                    agreed=True,
                )
                return {}, holds
            if not sharded:
                # Full weights: rank 0 holds the average; sharded: every rank swapped in its own shards.
                runtime.broadcast_tensors(live.values())
            for task in tasks:
                result = self.task(task, model, runtime, step, "avg")
                if result is not None:
                    results[(task.name, "avg")] = result
        finally:
            self.window.restore(live, backup, step)
        return results, holds


def _default_task_failure(task: Task, error: BaseException | None) -> str:
    """What went wrong with a default task, where it came from, and a snippet that fixes it."""
    description = getattr(task, "description", None)
    origin = getattr(task, "origin", "built by tasks=None from the trainer's validation data")
    what = f"{description}; {origin}" if description else origin
    cause = describe_error(error) if error is not None else "unknown error"
    return (
        f"the default task {task.name!r} ({what}) failed at its first evaluation: {cause}. A default task "
        "that cannot evaluate this model is a configuration error, so training stops here (on_error "
        "does not apply). Pass tasks=[...] yourself, with a forward= that returns the model's logits, "
        f"for example:\n{default_task_fix(task, error)}"
    )
