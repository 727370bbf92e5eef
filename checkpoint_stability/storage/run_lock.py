"""One run per run directory: a lock that a second run cannot take and a killed run cannot keep."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.storage.confinement import UnsafePathError, open_confined
from checkpoint_stability.storage.json_files import read_json_object

LOCK_FILE = "lock.json"
EVALUATOR_LOCK_FILE = "evaluator.lock.json"
"""Held by the background evaluator of a run (``checkpoint-stability follow``): one evaluator per run."""


class RunDirectoryLocked(CheckpointStabilityError, RuntimeError):
    """Another live process holds the run directory."""


class LockingUnsupported(CheckpointStabilityError, OSError):
    """The file system cannot ``flock`` (some network file systems): the run goes on unlocked."""


_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/lock.json``, which also says who holds it.

    Two runs writing one directory would interleave their snapshots and histories, so the second is
    refused with the holder's pid, host and start time. The lock belongs to an open file, so the
    operating system drops it when its process dies, however it dies: the file a killed run leaves
    behind is stale, and the next run takes it over and rewrites it. (``flock`` is advisory and local:
    on file systems that do not support it, as some network ones, the lock is skipped with a warning
    by the caller.)

    Example::

        >>> import tempfile
        >>> from checkpoint_stability.storage.run_lock import RunLock, RunDirectoryLocked
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = RunLock(d)
        ...     try:
        ...         RunLock(d)
        ...     except RunDirectoryLocked as error:
        ...         print("refused")
        ...     first.release()
        refused
    """

    def __init__(self, directory: str | os.PathLike, name: str = LOCK_FILE):
        """``name``: the lock file (``lock.json`` for the training run, ``evaluator.lock.json`` for its
        background evaluator)."""
        import fcntl

        self.path = Path(directory) / name
        self._role = "run" if name == LOCK_FILE else "evaluator"
        # A link, a directory or a FIFO at lock.json is refused (UnsafePathError), never taken for "this
        # file system cannot lock": that would silently let two runs share the directory.
        try:
            fd = open_confined(directory, self.path, os.O_RDWR | os.O_CREAT)
        except UnsafePathError:
            raise
        except OSError as error:
            raise OSError(
                error.errno, f"cannot open the run directory's lock file ({error.strerror})", str(self.path)
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.path)
            os.close(fd)
            if self._role == "evaluator":
                message = (
                    f"{self.path.parent} is already being evaluated by another evaluator ({holder}); one "
                    "evaluator follows a run: stop the other first"
                )
            else:
                message = (
                    f"{self.path.parent} is in use by another run ({holder}); two runs cannot share a run "
                    "directory: give this one another dirpath, or stop the other"
                )
            raise RunDirectoryLocked(message) from None
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_LOCKING:
                raise LockingUnsupported(
                    error.errno, f"flock is not supported here ({error.strerror})", str(self.path)
                ) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)

    def release(self) -> None:
        """Unlock (the file stays: the next run takes it over). Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the file drops the flock

    def __del__(self):
        # A monitor that is dropped without close() must not keep its directory locked.
        with contextlib.suppress(Exception):
            self.release()


def _describe(path: Path) -> str:
    try:
        holder = read_json_object(path)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"pid {int(holder['pid'])} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "a process that has not said who it is yet"
