"""Crash-safe file replacement: a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from checkpoint_stability.storage.confinement import writable_file

WRITE_CHUNK = 16 << 20
"""Bytes per write call: large enough that the per-call cost vanishes, small enough to stay in the CPU's
cache between ``on_chunk`` and the write."""


def atomic_write_bytes(
    path: str | os.PathLike,
    data: bytes | memoryview,
    *,
    inside: str | os.PathLike | None = None,
    on_chunk: Callable[[memoryview], object] | None = None,
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content.

    The bytes go to ``.<name>.tmp-<pid>`` in the same directory (``os.replace`` is only atomic within
    one file system), are fsynced, renamed over ``path``, and the directory is fsynced so the rename
    itself survives a power loss. Raises ``OSError`` on failure, leaving ``path`` untouched.

    ``inside``: the run (or output) directory ``path`` belongs to; ``path`` must then be a regular file
    or missing, in a folder whose real path is inside it (``confinement.writable_file``), or
    ``confinement.UnsafePathError`` is raised and nothing is written.

    The bytes are written :data:`WRITE_CHUNK` at a time; ``on_chunk`` is called with each chunk just
    before it is written, while it is in the CPU's cache (a snapshot's checksum is taken that way).

    Example::

        atomic_write_bytes("run/state.json", b'{"step": 3}\\n')
    """
    view = memoryview(data).cast("B")
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
        with open(fd, "wb", buffering=0) as f:
            for begin in range(0, len(view), WRITE_CHUNK):
                chunk = view[begin : begin + WRITE_CHUNK]
                if on_chunk is not None:
                    on_chunk(chunk)
                while chunk:  # a raw write may take fewer bytes than given
                    chunk = chunk[f.write(chunk) :]
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
