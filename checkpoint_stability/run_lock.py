"""One run per run directory: a lock that a second run cannot take and a killed run cannot keep."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "lock.json"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory."""


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
        >>> from checkpoint_stability.run_lock import RunLock, RunDirectoryLocked
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = RunLock(d)
        ...     try:
        ...         RunLock(d)
        ...     except RunDirectoryLocked as error:
        ...         print("refused")
        ...     first.release()
        refused
    """

    def __init__(self, directory: str | os.PathLike):
        import fcntl

        self.path = Path(directory) / LOCK_FILE
        if self.path.is_symlink():
            raise ValueError(f"{self.path} is a symlink; refusing to lock through it")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.path)
            os.close(fd)
            raise RunDirectoryLocked(
                f"{self.path.parent} is in use by another run ({holder}); two runs cannot share a run "
                "directory: give this one another dirpath, or stop the other"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

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
        holder = json.loads(path.read_text() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"pid {int(holder['pid'])} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"
