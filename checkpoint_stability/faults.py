"""The fault policy: a fault at run time is reported once with its cause, recorded, and skipped — or,
with ``on_error="raise"``, raised on every rank together so that no rank waits in a collective."""

from __future__ import annotations

import logging
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from checkpoint_stability.history import History
from checkpoint_stability.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class FaultKind:
    """One kind of fault (phase, task, variant, exception type) and how often it happened."""

    phase: str
    task: str | None
    variant: str | None
    first_error: str
    first_step: int
    count: int = 1
    last_step: int | None = None

    def describe(self) -> str:
        if self.task is None:
            where = self.phase
        elif self.phase in ("sink", "report"):  # the "task" of a sink's fault is the sink's class
            where = f"{self.phase} {self.task}"
        else:
            where = f"{self.phase} of task {self.task!r}"
        if self.variant is not None:
            where += f" ({self.variant})"
        times = "once" if self.count == 1 else f"{self.count} times"
        steps = f"at step {self.first_step}"
        if self.count > 1:
            steps = f"first at step {self.first_step}, last at {self.last_step}"
        return f"{where}: {times} {self.first_error} ({steps})"


def describe_error(error: BaseException) -> str:
    """``Type: message`` with the file an ``OSError`` names (``repr`` drops it: ``OSError(30, ...)``).

    >>> describe_error(OSError(30, "Read-only file system", "/runs/exp/lock.json"))
    "OSError: [Errno 30] Read-only file system: '/runs/exp/lock.json'"
    """
    return f"{type(error).__name__}: {error}"


class FaultPolicy:
    """How the monitor meets a fault: warn about it once, record it, and go on; or raise, when
    ``on_error="raise"``.

    The same fault again (same phase, task, variant and exception type) is not warned about again: it
    is counted, each occurrence still gets its error line in the history, and :meth:`summary` gives one
    line per kind with its count for the end-of-run summary. So a task that fails at every snapshot
    makes one warning (with its traceback) and one line "failed 16 times", not 16 warnings.

    Under ``torch.distributed`` a fault that only rank 0 met (writing, logging, exporting) is held and
    raised on every rank at the end of the snapshot (:meth:`raise_held`); one that every rank reached
    together (``agreed``) may raise at once.

    Example::

        >>> from checkpoint_stability.runtime import Runtime
        >>> faults = FaultPolicy("warn", lambda: Runtime())
        >>> for step in (500, 1000):
        ...     faults.report("history", OSError(28, "No space left on device"), step=step)
        >>> faults.summary()
        ['history: 2 times OSError: [Errno 28] No space left on device (first at step 500, last at 1000)']
    """

    def __init__(self, on_error: str, runtime: Callable[[], Runtime]):
        self.on_error = on_error
        self._runtime = runtime
        self.history: History | None = None
        """Where error lines go once the run directory is open."""
        self.kinds: dict[tuple[str, str | None, str | None, str], FaultKind] = {}
        """Every kind of fault met, by (phase, task, variant, exception type), in the order first met."""
        self._held: BaseException | None = None

    @property
    def runtime(self) -> Runtime:
        return self._runtime()

    def report(
        self,
        phase: str,
        error: BaseException,
        *,
        step: int | None,
        task: str | None = None,
        variant: str | None = None,
        agreed: bool = False,
    ) -> None:
        """Report a fault and go on (or raise, if asked). ``step`` None: a fault of no step (0).

        ``agreed``: every rank reached this fault together, so ``on_error="raise"`` may raise at once.
        Otherwise the error is held and raised on every rank by :meth:`raise_held`.
        """
        step = step if step is not None else 0
        key = (phase, task, variant, type(error).__name__)
        kind = self.kinds.get(key)
        where = f" (task {task!r}, variant {variant})" if task else ""
        action = "stopping (on_error='raise')" if self.on_error == "raise" else "skipped"
        message = (
            f"checkpoint-stability: {phase} failed at step {step}{where}: {describe_error(error)}; {action}"
        )
        if kind is None:
            self.kinds[key] = FaultKind(phase, task, variant, describe_error(error), step)
            repeat = "" if self.on_error == "raise" else " (the same fault again is counted, not repeated)"
            logger.warning("%s%s\n%s", message, repeat, "".join(traceback.format_exception(error)).rstrip())
        else:
            kind.count += 1
            kind.last_step = step
            logger.debug(message)
        self._record(step, phase, describe_error(error), task, variant)
        if self.on_error == "raise":
            if agreed or self.runtime.world_size == 1:
                raise error
            self._held = self._held or error

    def note(self, step: int, phase: str, message: str) -> None:
        """Something skipped for a reason already reported: a warning and a history line, never fatal."""
        logger.warning("checkpoint-stability: %s", message)
        self._record(step, phase, message, None, None)

    def summary(self) -> list[str]:
        """One line per kind of fault met: where, how many times, the first error, and its steps."""
        return [kind.describe() for kind in self.kinds.values()]

    def _record(self, step: int, phase: str, text: str, task: str | None, variant: str | None) -> None:
        if self.history is None:
            return
        try:
            self.history.append_error(step, phase, text, task=task, variant=variant)
        except Exception as error:
            logger.warning("could not record the error in the history: %s", describe_error(error))

    def raise_held(self) -> None:
        """Raise, on every rank, the first fault held on any rank since the last call (collective)."""
        error, self._held = self._held, None
        failure = self.first_error_of_any_rank(error)
        if failure is not None:
            raise failure

    def first_error_of_any_rank(self, error: BaseException | None) -> BaseException | None:
        """The same exception on every rank (the lowest failing rank's), or None if no rank failed."""
        runtime = self.runtime
        if not runtime.any_rank(error is not None):
            return None
        if runtime.world_size == 1:
            return error
        for candidate in runtime.all_gather_object(_portable(error)):
            if candidate is not None:
                return candidate
        return error


def _portable(error: BaseException | None) -> BaseException | None:
    """``error`` if it survives being sent to another rank, else a RuntimeError with its text."""
    if error is None:
        return None
    try:
        pickle.dumps(error)  # torch's object collectives serialise in memory, between our own ranks
        return error
    except Exception:
        return RuntimeError(repr(error))
