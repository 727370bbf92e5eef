"""Reading the JSON files the library (or a tool before it) left on disk, whatever they now hold.

Every JSON document the library reads back — ``run.json``, ``buffer/manifest.json``, ``best.json``,
``analysis.json``, a sharded checkpoint's index, a Trainer's ``trainer_state.json`` — goes through
:func:`read_json_object`. A file that is unreadable, not UTF-8, not JSON, nested deeper than Python's
recursion allows, holding ``NaN``/``Infinity``, or not an object at its top level raises
:class:`DamagedJSONError` naming the file and what is wrong with it, never a bare ``RecursionError``,
``UnicodeDecodeError`` or ``KeyError`` from deep inside a reader.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from checkpoint_stability.errors import CheckpointStabilityError


class DamagedJSONError(CheckpointStabilityError, ValueError):
    """A JSON file that cannot be used: unreadable, malformed, or not the object its reader expects."""


def _reject_constant(name: str) -> Any:
    # json accepts NaN/Infinity by default; nothing in the library writes them.
    raise ValueError(f"the non-standard constant {name}")


def parse_json_object(data: bytes | str, what: str) -> dict:
    """``data`` parsed as one JSON object; :class:`DamagedJSONError` naming ``what`` otherwise.

    Example::

        >>> parse_json_object(b'{"step": 3}', "best.json")
        {'step': 3}
        >>> try:
        ...     parse_json_object("[" * 100_000, "best.json")
        ... except DamagedJSONError as error:
        ...     print(error)
        best.json is not valid JSON: nested too deeply
    """
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise DamagedJSONError(f"{what} is not valid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise DamagedJSONError(f"{what} is not valid JSON: not UTF-8 text") from None
    except ValueError as error:
        raise DamagedJSONError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise DamagedJSONError(f"{what} must hold a JSON object at its top level, not {type(value).__name__}")
    return value


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """The JSON object in ``path``. ``FileNotFoundError`` when it is missing (callers often treat that as
    "not written yet"); :class:`DamagedJSONError` for anything else that makes it unusable.

    Example::

        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = pathlib.Path(d, "run.json")
        ...     _ = path.write_text('{"world_size": 2}')
        ...     read_json_object(path)
        {'world_size': 2}
    """
    path = Path(path)
    what = what or str(path)
    try:
        # O_NONBLOCK: a FIFO planted under the name would otherwise block the reader forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DamagedJSONError(f"{what} cannot be read: {error.strerror or error}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DamagedJSONError(f"{what} is not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as error:
        raise DamagedJSONError(f"{what} cannot be read: {error.strerror or error}") from None
    finally:
        os.close(fd)
    return parse_json_object(data, what)
