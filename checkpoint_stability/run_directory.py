"""Opening a run directory for a live run: checked, locked, its run record written, its history and
best-model selection open, and what a resumed run abandoned dropped."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.faults import describe_error
from checkpoint_stability.history import History
from checkpoint_stability.selection import BestModelSelector
from checkpoint_stability.storage.atomic_files import atomic_write_text
from checkpoint_stability.storage.confinement import UnsafePathError, writable_file
from checkpoint_stability.storage.export import ModelExporter
from checkpoint_stability.storage.json_files import read_json_object
from checkpoint_stability.storage.run_lock import LOCK_FILE, LockingUnsupported, RunLock

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
_OWN_FOLDERS = ("buffer", "examples", "exports", "tensorboard")
_OWN_FILES = ("history.jsonl", "drift.jsonl", "best.json", RUN_FILE, LOCK_FILE)


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
    ):
        self.path = Path(path)
        self.lock: RunLock | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        for name in _OWN_FOLDERS:
            if (self.path / name).is_symlink():
                raise UnsafePathError(
                    f"{self.path / name} is a symlink; the run directory must hold its own files "
                    "(nothing outside it is read, written or deleted)"
                )
        for name in _OWN_FILES:
            writable_file(self.path, self.path / name)
        self.lock = _lock(self.path)
        try:
            self._check_run_record({"world_size": world_size, "sharded": sharded})
            self.history = History(self.path)
            self.selector = BestModelSelector(
                self.path,
                select=config.select,
                metric=config.select_metric,
                mode=config.select_mode,
                # A window never holds more than `window` snapshots, so a larger threshold would never pass.
                min_snapshots=min(config.min_snapshots, config.window),
                exporter=exporter,
                holdout=config.holdout,
            )
            found = self._previous_results() if resume_step is None else []
            if found:
                resume_step = self._replace_or_refuse(config, found)
            self.resume_step = resume_step
            """The step the run continues from: the caller's, ``-1`` when replacing an earlier run."""
            if resume_step is not None:
                dropped = self.history.truncate_after(resume_step)
                self.selector.truncate_after(resume_step)
                if dropped:
                    logger.info("resuming from step %d: dropped %d newer history lines", resume_step, dropped)
        except BaseException:
            self.release()
            raise

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
        if self.selector.best is not None:
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

    def _check_run_record(self, now: dict) -> None:
        """A window of shards only makes sense with the same number of ranks: refuse anything else."""
        path = self.path / RUN_FILE
        if path.exists():
            try:
                before = read_json_object(path)
            except (OSError, ValueError) as error:  # DamagedJSONError is a ValueError
                logger.warning("ignoring unreadable %s (%s)", path, error)
                before = None
            # Full weights resume under any world size (rank 0 holds them); shards need the same split.
            involves_shards = isinstance(before, dict) and (before.get("sharded") or now["sharded"])
            if before is not None and involves_shards and before != now:
                raise ValueError(
                    f"{self.path} was written by {before.get('world_size')} ranks "
                    f"({'sharded' if before.get('sharded') else 'full'} weights); this run has "
                    f"{now['world_size']} ({'sharded' if now['sharded'] else 'full'}). A window of "
                    "sharded snapshots can only be resumed with the same world size and sharding; "
                    "use a new dirpath"
                )
            if before == now:
                return
        atomic_write_text(path, json.dumps(now) + "\n", inside=self.path)


def _lock(path: Path) -> RunLock | None:
    try:
        return RunLock(path)
    except (ImportError, LockingUnsupported) as error:
        # No fcntl (Windows) or a file system without flock (some network ones): go on unlocked. Any
        # other failure (read-only, no permission, lock.json a directory) is the directory's fault
        # and is raised, naming the file: locking is never silently turned off.
        logger.warning(
            "cannot lock the run directory %s (%s); two runs there would collide", path, describe_error(error)
        )
        return None
