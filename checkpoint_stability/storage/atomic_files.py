"""Crash-safe file replacement: a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from checkpoint_stability.storage.confinement import writable_file


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | memoryview, *, inside: str | os.PathLike | None = None
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content.

    The bytes go to ``.<name>.tmp-<pid>`` in the same directory (``os.replace`` is only atomic within
    one file system), are fsynced, renamed over ``path``, and the directory is fsynced so the rename
    itself survives a power loss. Raises ``OSError`` on failure, leaving ``path`` untouched.

    ``inside``: the run (or output) directory ``path`` belongs to; ``path`` must then be a regular file
    or missing, in a folder whose real path is inside it (``confinement.writable_file``), or
    ``confinement.UnsafePathError`` is raised and nothing is written.

    Example::

        atomic_write_bytes("run/state.json", b'{"step": 3}\\n')
    """
    path = Path(path)
    if inside is not None:
        writable_file(inside, path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # O_EXCL | O_NOFOLLOW: a link planted under the temporary name is never written through.
        with contextlib.suppress(FileNotFoundError):
            if os.path.islink(tmp) or os.path.isfile(tmp):
                tmp.unlink()  # left by a crash of this pid's predecessor
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if inside is not None:
            writable_file(inside, path)  # checked again: the target may have been swapped meanwhile
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, inside: str | os.PathLike | None = None) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text.

    Example::

        atomic_write_text("run/notes.txt", "resumed at step 3000\\n")
    """
    atomic_write_bytes(path, text.encode("utf-8"), inside=inside)


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        # Some platforms (Windows) cannot open directories; the rename has happened regardless.
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems reject fsync on directories; durability of the entry is then best effort.
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories: for files written by code that does not
    (``save_pretrained``), before the directory is renamed into place."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(root))
