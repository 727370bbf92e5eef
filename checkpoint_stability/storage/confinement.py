"""Writes stay inside their directory: no file the library writes, repairs or deletes is reached
through a link, and none lies outside the run (or output) directory it belongs to.

A run directory is shared by people and tools (rsync, a cluster's scratch clean-up, a colleague's
``ln -s``), and the library truncates and appends to files in it when a run resumes. A symlink placed
where a history or examples file belongs would otherwise turn "repair the torn last line" into
"truncate a file elsewhere". So every path is checked when it is opened, not only when it is created:

* the file is missing or a regular file: not a symlink, a directory, a FIFO or a device;
* the real path of its folder lies inside the real path of the root it is written under.

The checks run again on the opened descriptor (``O_NOFOLLOW`` and ``fstat``), so a link swapped in
between the check and the open is refused too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from checkpoint_stability.errors import CheckpointStabilityError


class UnsafePathError(CheckpointStabilityError, ValueError):
    """A file to be written is a link, not a regular file, or lies outside its directory."""


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, in words ("a symlink", "a FIFO", ...), for messages."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether the real path of ``path`` is ``root``'s real path or below it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def writable_file(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path``, checked as a file the library may create, write, truncate or replace under ``root``.

    Raises :class:`UnsafePathError` naming the file and what it is when it is a symlink, a directory,
    a FIFO or anything else than a regular file, or when its folder resolves outside ``root``.

    Example::

        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as run:
        ...     os.symlink("/etc/hostname", os.path.join(run, "history.jsonl"))
        ...     try:
        ...         writable_file(run, os.path.join(run, "history.jsonl"))
        ...     except UnsafePathError as error:
        ...         print("refused:", "symlink" in str(error))
        refused: True
    """
    path = Path(path)
    if not is_inside(path.parent, root):
        raise UnsafePathError(
            f"{path} resolves to {os.path.realpath(path.parent)}, outside {root}; the library only "
            "writes inside its own directory (is a folder on the way a symlink?)"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise UnsafePathError(
            f"{path} is {file_kind(mode)}; the library only writes regular files of its own there "
            "(remove it, or use another directory)"
        )
    return path


def open_confined(root: str | os.PathLike, path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file checked by :func:`writable_file`, without following a link swapped in since,
    and refusing anything that turns out not to be a regular file. Returns the descriptor."""
    path = writable_file(root, path)
    # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePathError(
                f"{path} became a symlink; the library does not write through links"
            ) from None
        raise
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise UnsafePathError(
                f"{path} is {file_kind(found)}; the library only writes regular files there"
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
