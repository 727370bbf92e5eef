"""Opening a run directory for a live run: checked, locked, its run record written, its history and
best-model selection open, and what a resumed run abandoned dropped."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.faults import describe_error
from checkpoint_stability.history import History
from checkpoint_stability.selection import BestModelSelector
from checkpoint_stability.storage.atomic_files import atomic_write_text
from checkpoint_stability.storage.confinement import UnsafePathError, writable_file
from checkpoint_stability.storage.export import ModelExporter
from checkpoint_stability.storage.json_files import read_json_object
from checkpoint_stability.storage.run_lock import EVALUATOR_LOCK_FILE, LOCK_FILE, LockingUnsupported, RunLock

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ROLES = ("inline", "trainer", "evaluator")
_OWN_FOLDERS = ("buffer", "examples", "exports", "tensorboard")
_OWN_FILES = ("history.jsonl", "drift.jsonl", "best.json", "evaluator.json", RUN_FILE, LOCK_FILE)


class ExistingRunError(CheckpointStabilityError, FileExistsError):
    """A run that is not resuming found another run's results in its run directory (and no
    ``overwrite=True``): nothing is deleted on a guess."""


class RunDirectory:
    """A run directory held by one live run (rank 0 does this; other ranks only read what it broadcasts).

    Opening it: the folder is created; the library's own folders and files in it are checked (no link,
    nothing that is not a regular file, nothing resolving outside); ``lock.json`` is locked so a second
    run is refused; ``run.json`` records the world size and whether weights are sharded (a sharded run
    resumes only with the same split); the history and the best-model selector open; and, when
    resuming from ``resume_step``, newer history lines and a newer best are dropped. A run that is not
    resuming (``resume_step=None``) and finds another run's results (history lines, ``best.json``, a
    buffered window) raises :class:`ExistingRunError`, unless ``config.overwrite``: then they are all
    dropped, as a resume from before the first step would, and :attr:`resume_step` says ``-1`` so the
    buffer and the TensorBoard run do the same. A failure at any point releases what was taken.

    Example::

        >>> import tempfile
        >>> from checkpoint_stability.config import StabilityConfig
        >>> with tempfile.TemporaryDirectory() as d:
        ...     run = RunDirectory(d, StabilityConfig(), world_size=1, sharded=False)
        ...     sorted(p.name for p in run.path.iterdir())
        ...     run.release()
        ['examples', 'lock.json', 'run.json']
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config,
        *,
        world_size: int,
        sharded: bool,
        exporter: ModelExporter | None = None,
        resume_step: int | None = None,
        role: str = "inline",
    ):
        """``role``: ``"inline"`` (a run that evaluates itself), ``"trainer"`` (the training side of a
        background-evaluated run: it snapshots only, so the history and the best model are left to the
        evaluator, which learns of a resume from ``run.json``'s ``generation``), or ``"evaluator"`` (the
        background evaluator: it holds ``evaluator.lock.json`` and reads ``run.json``)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.path = Path(path)
        self.role = role
        self.lock: RunLock | None = None
        self.selector: BestModelSelector | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        for name in _OWN_FOLDERS:
            if (self.path / name).is_symlink():
                raise UnsafePathError(
                    f"{self.path / name} is a symlink; the run directory must hold its own files "
                    "(nothing outside it is read, written or deleted)"
                )
        for name in (*_OWN_FILES, EVALUATOR_LOCK_FILE):
            writable_file(self.path, self.path / name)
        self.lock = _lock(self.path, EVALUATOR_LOCK_FILE if role == "evaluator" else LOCK_FILE)
        try:
            if role != "evaluator":
                # First: a window of shards cannot continue under another split, whatever else is here.
                self._check_split(world_size=world_size, sharded=sharded)
            self.history = History(self.path, read_only=role == "trainer")
            if role != "trainer":
                self.selector = BestModelSelector(
                    self.path,
                    select=config.select,
                    metric=config.select_metric,
                    mode=config.select_mode,
                    # A window never holds more than `window` snapshots: a larger threshold never passes.
                    min_snapshots=min(config.min_snapshots, config.window),
                    exporter=exporter,
                    holdout=config.holdout,
                )
            found = self._previous_results() if resume_step is None and role != "evaluator" else []
            if found:
                resume_step = self._replace_or_refuse(config, found)
            self.resume_step = resume_step
            """The step the run continues from: the caller's, ``-1`` when replacing an earlier run."""
            if role != "evaluator":
                self._write_run_record(
                    config, world_size=world_size, sharded=sharded, resume_step=resume_step
                )
            if resume_step is not None and role != "trainer":
                dropped = self.history.truncate_after(resume_step)
                if self.selector is not None:
                    self.selector.truncate_after(resume_step)
                if dropped:
                    logger.info("resuming from step %d: dropped %d newer history lines", resume_step, dropped)
        except BaseException:
            self.release()
            raise

    def mark_closed(self, last_step: int | None) -> None:
        """Training has ended (background mode): the evaluator finishes what is buffered and stops."""
        record = read_run_record(self.path) or {}
        record.update(closed=True, last_step=last_step)
        atomic_write_text(self.path / RUN_FILE, json.dumps(record) + "\n", inside=self.path)

    def release(self) -> None:
        """Let the directory go (the lock); safe to call twice."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _previous_results(self) -> list[str]:
        """What an earlier run left here that a fresh run would replace, described for the user."""
        found = []
        records = self.history.records()
        if records:
            found.append(f"history.jsonl with {len(records)} records up to step {records[-1]['step']}")
        elif self.history.errors():
            found.append("history.jsonl with error lines")
        if self.selector is not None and self.selector.best is not None:
            best = self.selector.best
            found.append(f"best.json naming the step-{best['step']} {best['variant']} model")
        buffer = self.path / "buffer"
        if (buffer / "manifest.json").exists() or any(buffer.glob("rank-*/manifest.json")):
            found.append("a buffered window of snapshots (buffer/)")
        return found

    def _replace_or_refuse(self, config, previous: list[str]) -> int:
        found = "; ".join(previous)
        if not config.overwrite:
            raise ExistingRunError(
                f"the run directory {self.path} holds another run's results ({found}), and this run is not "
                "resuming from a training checkpoint, so they would be replaced. Keep them: pass another "
                "dirpath= (or output directory), or resume that run from its checkpoint. Replace them: pass "
                "overwrite=True"
            )
        logger.warning("overwrite=True: replacing the earlier run's results in %s (%s)", self.path, found)
        return -1

    def _check_split(self, *, world_size: int, sharded: bool) -> None:
        """A window of shards only makes sense with the same number of ranks: anything else is refused."""
        before = read_run_record(self.path)
        if before is None:
            return
        # Full weights resume under any world size (rank 0 holds them); shards need the same split.
        if (before.get("sharded") or sharded) and (before.get("world_size"), bool(before.get("sharded"))) != (
            world_size,
            sharded,
        ):
            raise ValueError(
                f"{self.path} was written by {before.get('world_size')} ranks "
                f"({'sharded' if before.get('sharded') else 'full'} weights); this run has "
                f"{world_size} ({'sharded' if sharded else 'full'}). A window of "
                "sharded snapshots can only be resumed with the same world size and sharding; "
                "use a new dirpath"
            )

    def _write_run_record(self, config, *, world_size: int, sharded: bool, resume_step: int | None) -> None:
        """``run.json``: how the run is split, how it is evaluated, and, for a background evaluator,
        each opening's ``generation`` with the step it resumed from."""
        before = read_run_record(self.path)
        now: dict[str, Any] = {"world_size": world_size, "sharded": sharded}
        if config.evaluation == "background":
            generation = (before or {}).get("generation", 0)
            now.update(
                evaluation="background",
                config=config.to_json(),
                generation=(generation if isinstance(generation, int) else 0) + 1,
                resumed_from=resume_step,
                closed=False,
            )
        if before == now:
            return
        atomic_write_text(self.path / RUN_FILE, json.dumps(now) + "\n", inside=self.path)


def read_run_record(path: str | os.PathLike) -> dict | None:
    """``<run dir>/run.json`` as a dict; None when missing or unreadable (warned)."""
    record_path = Path(path) / RUN_FILE
    if not record_path.exists():
        return None
    try:
        return read_json_object(record_path)
    except (OSError, ValueError) as error:  # DamagedJSONError is a ValueError
        logger.warning("ignoring unreadable %s (%s)", record_path, error)
        return None


def _lock(path: Path, name: str = LOCK_FILE) -> RunLock | None:
    try:
        return RunLock(path, name)
    except (ImportError, LockingUnsupported) as error:
        # No fcntl (Windows) or a file system without flock (some network ones): go on unlocked. Any
        # other failure (read-only, no permission, lock.json a directory) is the directory's fault
        # and is raised, naming the file: locking is never silently turned off.
        logger.warning(
            "cannot lock the run directory %s (%s); two runs there would collide", path, describe_error(error)
        )
        return None
