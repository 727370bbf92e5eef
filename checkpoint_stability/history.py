"""The append-only, crash-tolerant on-disk history of a run's evaluation results.

Layout under a run directory ``root``::

    history.jsonl               one JSON object per line: score lines {"step", "task", "variant",
                                "window", "n_models", "score", "mtv", "is", "time"} and error lines
                                {"step", "phase", "task", "variant", "error"} (told apart by "error")
    drift.jsonl                 one line per snapshot: {"step", "previous_step", "previous", "average",
                                "n_models", "time"}: how far the weights moved (``drift=True``)
    examples/<task>.meta.json   written once per task: {"task", "kind", "metric", "example_ids", "targets"}
    examples/<task>.jsonl       one line per (step, variant, window):
                                {"step", "variant", "window", "outputs", "correct", "choice_logprobs"?}

A training run can be killed (kill -9) at any instant and resumed from an earlier step, so:

* every line is written with a single ``write`` followed by ``fsync``; a crash can leave at most one torn,
  newline-less last line, which the next reader drops and truncates away so new lines do not glue onto it;
* files that are rewritten (meta files, :meth:`History.truncate_after`) go through a temporary file and
  ``os.replace``, so readers see either the old or the new content, never a mix;
* reading never fails on damaged content: unreadable lines are skipped with a warning and left in place.

Write failures raise ``OSError``; whether that stops the run is the caller's decision. JSON only, no pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.records import BIAS_FIELDS, HOLDOUT_FIELDS
from checkpoint_stability.storage.atomic_files import atomic_write_bytes, atomic_write_text, fsync_directory
from checkpoint_stability.storage.confinement import UnsafePathError, is_inside, open_confined, writable_file
from checkpoint_stability.storage.json_files import read_json_object
from checkpoint_stability.tasks.base import validate_task_name as _validate_name
from checkpoint_stability.validation import is_real, require_int

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
EXAMPLES_DIR = "examples"
SCORE_KEYS = ("step", "task", "variant", "window", "n_models", "score", "mtv", "is", "time")
OPTIONAL_SCORE_KEYS = (*BIAS_FIELDS, *HOLDOUT_FIELDS)
"""Fields a score line may add (a choice task's answer bias, the two halves' scores with ``holdout``), each
in [0, 1]; lines without them stay valid, and readers of older releases ignore them."""
DRIFT_FILE = "drift.jsonl"
DRIFT_KEYS = ("step", "previous_step", "previous", "average", "n_models", "time")
ERROR_KEYS = ("step", "phase", "task", "variant", "error")
META_KEYS = ("task", "kind", "metric", "example_ids", "targets")

_META_SUFFIX = ".meta.json"


def validate_task_name(task: object) -> str:
    """A task name that is safe as a file name under ``examples/`` (``"mean"`` allowed: aggregates)."""
    return _validate_name(task, allow_reserved=True)


_OUTPUTS_SUFFIX = ".jsonl"


# ------------------------------------------------------------------------------------------------ validation


def _float(value: object, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not is_real(value) or not math.isfinite(value):
        allowed = "a finite float or None" if optional else "a finite float"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _name(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; numpy/torch values are converted through their ``tolist()``.

    A validating encoder (non-finite floats, non-string keys and other types are errors), not
    ``tasks.base.plain_value``, which only unwraps tensors and numpy scalars so outputs compare by equality.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(
                f"{where} contains the non-finite float {f!r}; only finite floats are allowed "
                "(log-probabilities, which may be -inf, belong in choice_logprobs)"
            )
        return f
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where} contains a dict with non-string keys; JSON objects need string keys")
        return {k: _json_value(v, where) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _json_value(value.tolist(), where)
    raise ValueError(f"{where} contains {type(value).__name__} {value!r}, which is not JSON-serializable")


def _encode_logprobs(value: Any, where: str) -> Any:
    """Nested lists of floats; -inf becomes null because strict JSON has no infinities."""
    if isinstance(value, (list, tuple)):
        return [_encode_logprobs(v, where) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, numbers.Number):
        return _encode_logprobs(value.tolist(), where)
    if not is_real(value):
        raise ValueError(f"{where} must hold (nested lists of) floats, got {type(value).__name__} {value!r}")
    f = float(value)
    if math.isnan(f) or f == math.inf:
        # null already means -inf, so +inf could not round-trip; a log-probability is never > 0 anyway.
        raise ValueError(f"{where} contains {f!r}; log-probabilities must be finite floats or -inf")
    return None if f == -math.inf else f


class _Bad(Exception):
    """A line that parsed as JSON but is not a valid record of its file."""


def _decode_logprobs(rows: list) -> list[list[float]]:
    """Rows of choice log-probabilities, ``null`` read as -inf. Anything but a list of flat rows of
    numbers is damage; checked without recursion, so a line nested thousands deep is skipped, not a
    ``RecursionError``."""
    decoded = []
    for row in rows:
        if not isinstance(row, list):
            raise _Bad
        values = []
        for value in row:
            if value is None:
                values.append(-math.inf)
            elif type(value) in (int, float):
                values.append(value)
            else:
                raise _Bad
        decoded.append(values)
    return decoded


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN/Infinity by default; nothing here writes them, so such a line is damaged.
    raise ValueError(f"non-standard JSON constant {name}")


def _loads_object(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


_LARGEST_INT = 2**63 - 1  # no step, window or count is larger; JSON itself has no bound


def _is_int(value: object, minimum: int) -> bool:
    return type(value) is int and minimum <= value <= _LARGEST_INT


def _is_finite(value: object) -> bool:
    # An int of 400 digits parses, and math.isfinite would raise OverflowError on it.
    if type(value) is int:
        return abs(value) <= _LARGEST_INT
    return type(value) is float and math.isfinite(value)


def _check_history_line(obj: dict) -> dict:
    if "error" in obj:
        ok = (
            all(k in obj for k in ERROR_KEYS)
            and _is_int(obj["step"], 0)
            and isinstance(obj["phase"], str)
            and isinstance(obj["task"], (str, type(None)))
            and isinstance(obj["variant"], (str, type(None)))
            and isinstance(obj["error"], str)
        )
    else:
        ok = (
            all(k in obj for k in SCORE_KEYS)
            and _is_int(obj["step"], 0)
            and isinstance(obj["task"], str)
            and isinstance(obj["variant"], str)
            and _is_int(obj["window"], 1)
            and _is_int(obj["n_models"], 1)
            and _is_finite(obj["score"])
            and (obj["mtv"] is None or _is_finite(obj["mtv"]))
            and (obj["is"] is None or _is_finite(obj["is"]))
            and _is_finite(obj["time"])
        )
    if not ok:
        raise _Bad
    return obj


def _check_drift_line(obj: dict) -> dict:
    ok = (
        all(k in obj for k in DRIFT_KEYS)
        and _is_int(obj["step"], 0)
        and (obj["previous_step"] is None or _is_int(obj["previous_step"], 0))
        and (obj["previous"] is None or _is_drift(obj["previous"]))
        and (obj["average"] is None or _is_drift(obj["average"]))
        and _is_int(obj["n_models"], 1)
        and _is_finite(obj["time"])
    )
    if not ok:
        raise _Bad
    return obj


def _is_drift(value: object) -> bool:
    return _is_finite(value) and value >= 0  # type: ignore[operator]  # a finite float here


def _is_score(value: object) -> bool:
    # JSON gives bool, int or float; anything else in a "correct" list is damage.
    return isinstance(value, (int, float)) and 0 <= value <= 1


def _check_outputs_line(obj: dict) -> dict:
    ok = (
        _is_int(obj.get("step"), 0)
        and isinstance(obj.get("variant"), str)
        and _is_int(obj.get("window"), 1)
        and isinstance(obj.get("outputs"), list)
        and isinstance(obj.get("correct"), list)
        and len(obj["correct"]) == len(obj["outputs"])
        and all(_is_score(value) for value in obj["correct"])
    )
    if not ok:
        raise _Bad
    if "choice_logprobs" in obj:
        logprobs = obj["choice_logprobs"]
        if not isinstance(logprobs, list) or len(logprobs) != len(obj["outputs"]):
            raise _Bad
        obj["choice_logprobs"] = _decode_logprobs(logprobs)
    return obj


def _check_meta(obj: dict | None, task: str) -> dict | None:
    if (
        obj is None
        or not all(k in obj for k in META_KEYS)
        or obj["task"] != task
        or not isinstance(obj["kind"], str)
        or not isinstance(obj["metric"], str)
        or not isinstance(obj["example_ids"], list)
        or not isinstance(obj["targets"], list)
    ):
        return None
    return obj


def _dumps(obj: dict) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------ jsonl file


class _JsonlFile:
    """One append-only JSONL file; its valid records are read from the disk when asked for.

    Nothing is kept in memory between a write and the next read: a run that lasts a week appends
    hundreds of thousands of lines (per-example outputs above all) and must not hold them all. What a
    read parsed is cached until the next append, so repeated reads of a finished run parse it once.
    """

    def __init__(
        self, path: Path, check: Callable[[dict], dict], root: Path | None, *, readable: bool = True
    ):
        self.path = path
        self._check = check
        # False for a file refused by a read-only opener (a link, a FIFO): it reads as empty.
        self._readable = readable
        # The run directory the file must stay inside; None: opened for reading only (never repaired).
        self._root = root
        if root is not None:
            writable_file(root, path)
        # True when the file ends without "\n" and could not be repaired: the next append starts one.
        self._needs_newline = False
        self._cache: list[dict] | None = None
        self._load()

    @property
    def items(self) -> list[dict]:
        """The valid records, in file order (damaged lines skipped)."""
        if self._cache is None:
            _, lines, tail = self._read_lines()
            if tail.strip():
                lines.append(tail)  # a complete record whose newline could not be written
            self._cache = [item for item in map(self._parse, lines) if item is not None]
        return self._cache

    def _parse(self, raw: bytes) -> dict | None:
        if not raw.strip():
            return None
        obj = _loads_object(raw)
        if obj is None:
            return None
        try:
            return self._check(obj)
        except _Bad:
            return None

    def _read_lines(self) -> tuple[bytes, list[bytes], bytes]:
        if not self._readable:
            return b"", [], b""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b"", [], b""
        *lines, tail = data.split(b"\n")
        return data, lines, tail

    def _load(self) -> None:
        """Check the file once when it is opened: count damaged lines, repair a torn end."""
        data, lines, tail = self._read_lines()
        items: list[dict] = []
        bad = 0
        for raw in lines:
            if raw.strip():
                item = self._parse(raw)
                if item is None:
                    bad += 1
                else:
                    items.append(item)
        cut_at = None
        unterminated = False
        if tail.strip():
            obj = _loads_object(tail)
            if obj is None:
                # Every line is written as "{...}\n" in one go, so a newline-less unparsable tail is the
                # prefix of a line whose write was interrupted: it never held a complete record.
                if self._root is not None:  # read-only: nothing is dropped from the file
                    logger.info("%s: dropping a torn last line left by an interrupted write", self.path)
                cut_at = len(data) - len(tail)
            else:
                item = self._parse(tail)
                if item is None:
                    bad += 1
                else:
                    items.append(item)
                unterminated = True
        elif tail:
            cut_at = len(data) - len(tail)  # whitespace residue: harmless, but would precede the next line
        if bad:
            logger.warning("%s: skipped %d damaged line(s); they are left in the file", self.path, bad)
        if self._root is None:
            self._cache = items
            return
        try:
            if cut_at is not None:
                fd = open_confined(self._root, self.path, os.O_RDWR)
                try:
                    os.ftruncate(fd, cut_at)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif unterminated:
                self._write(b"\n")
        except OSError as e:
            logger.warning("%s: could not repair the end of the file (%s); appending after it", self.path, e)
            self._needs_newline = True
        self._cache = items  # what the monitor reads right after opening; dropped at the first append

    def _writable_root(self) -> Path:
        if self._root is None:
            raise RuntimeError(f"{self.path} was opened for reading only")
        return self._root

    def _write(self, data: bytes) -> None:
        created = not self.path.exists()
        fd = open_confined(self._writable_root(), self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                # Do not leave half a line behind: the next append would glue onto it.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.path.parent)

    def append(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        if self._needs_newline:
            data = b"\n" + data
        # Parse back what is written: a line a fresh reader would skip must not reach the file.
        for line in lines:
            self._check(json.loads(line))
        self._write(data)
        self._needs_newline = False
        self._cache = None

    def drop_after(self, step: int) -> int:
        _, lines, tail = self._read_lines()
        if tail.strip() and _loads_object(tail) is not None:
            lines.append(tail)  # a torn tail (unparsable) is dropped by the rewrite
        kept: list[bytes] = []
        dropped = 0
        for raw in lines:
            if not raw.strip():
                continue
            item = self._parse(raw)
            if item is not None and item["step"] > step:
                dropped += 1
            else:
                kept.append(raw)  # damaged lines stay, byte for byte
        if dropped:
            atomic_write_bytes(self.path, b"".join(raw + b"\n" for raw in kept), inside=self._writable_root())
            self._needs_newline = False
        self._cache = None
        return dropped


# --------------------------------------------------------------------------------------------------- history


class History:
    """Append-only history of a run's scores, errors and per-example outputs, safe against kill -9.

    Opening a run directory loads everything in it (creating it if missing) and repairs a line torn by
    a crash. Every append is fsynced before it returns; after any call the in-memory view equals what a
    fresh ``History(root)`` would read. One process writes a run directory (e.g. rank 0); calls from
    several threads of that process are serialized.

    Example::

        h = History("runs/exp1")
        h.append({"step": 1000, "task": "hellaswag", "variant": "avg", "window": 4, "n_models": 4,
                  "score": 0.41, "mtv": 0.012, "is": None})
        h.write_meta("hellaswag", kind="multiple_choice", metric="acc", example_ids=[0, 1], targets=[2, 0])
        h.append_outputs("hellaswag", 1000, "avg", 4, outputs=[2, 1], correct=[True, False],
                         choice_logprobs=[[-1.2, -3.0, -0.5], [-2.0, -0.1, float("-inf")]])
        resume_from = 1000
        h.truncate_after(resume_from)          # drop results of steps the resumed run will redo
        [r["score"] for r in h.records(task="hellaswag", variant="avg")]

    In ``choice_logprobs``, ``-inf`` (an impossible choice) is stored as JSON ``null`` and read back as
    ``float("-inf")``; NaN and ``+inf`` are rejected.
    """

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False):
        """``read_only``: read what is there without creating, repairing or writing anything (a report of
        a run that may still be going); files that are not regular files inside ``root`` are then
        skipped with a warning instead of refused."""
        self.root = Path(root)
        self.read_only = read_only
        self._examples_dir = self.root / EXAMPLES_DIR
        if not read_only:
            self._examples_dir.mkdir(parents=True, exist_ok=True)
            if not is_inside(self._examples_dir, self.root):
                raise UnsafePathError(
                    f"{self._examples_dir} resolves to {os.path.realpath(self._examples_dir)}, outside "
                    "the run directory; the run directory must hold its own files"
                )
        self._lock = threading.RLock()
        self._warned_misfits: set[str] = set()
        self._outputs: dict[str, _JsonlFile] = {}
        self._metas: dict[str, dict] = {}
        self._history = self._open_jsonl(self.root / HISTORY_FILE, _check_history_line)
        self._drift = self._open_jsonl(self.root / DRIFT_FILE, _check_drift_line)
        try:
            entries = sorted(self._examples_dir.iterdir()) if self._examples_dir.is_dir() else []
        except OSError as e:
            if not read_only:
                raise
            logger.warning("%s: cannot list the examples (%s); reading none", self._examples_dir, e)
            entries = []
        for path in entries:
            name = path.name
            if name.endswith(_META_SUFFIX):
                task = self._task_from_file_name(name[: -len(_META_SUFFIX)])
                if task is not None:
                    meta = self._read_meta(path, task)
                    if meta is not None:
                        self._metas[task] = meta
            elif name.endswith(_OUTPUTS_SUFFIX):
                task = self._task_from_file_name(name[: -len(_OUTPUTS_SUFFIX)])
                if task is not None:
                    self._outputs[task] = self._open_jsonl(path, _check_outputs_line)

    def _open_jsonl(self, path: Path, check: Callable[[dict], dict]) -> _JsonlFile:
        """Writable: a file that is a link, not regular or outside the run raises UnsafePathError.
        Read-only: it is skipped with a warning (read as empty)."""
        if not self.read_only:
            return _JsonlFile(path, check, self.root)
        try:
            writable_file(self.root, path)
        except UnsafePathError as error:
            logger.warning("%s; not reading it", error)
            return _JsonlFile(path, check, None, readable=False)
        return _JsonlFile(path, check, None)

    def _writable_root(self) -> Path:
        if self.read_only:
            raise RuntimeError(f"the history in {self.root} was opened read-only")
        return self.root

    @staticmethod
    def _task_from_file_name(stem: str) -> str | None:
        try:
            return validate_task_name(stem)
        except ValueError:
            return None  # not ours (hidden or temporary file)

    def _read_meta(self, path: Path, task: str) -> dict | None:
        if not self.read_only:
            writable_file(self.root, path)  # a link here is refused, as for the examples lines
        try:
            writable_file(self.root, path)
            meta = _check_meta(read_json_object(path), task)
        except (OSError, ValueError) as e:  # UnsafePathError and DamagedJSONError are ValueErrors
            logger.warning("%s: the task's meta file cannot be used (%s); ignoring it", path, e)
            return None
        if meta is None:
            logger.warning("%s: the task's meta file is damaged; ignoring it", path)
        return meta

    # ---------------------------------------------------------------------------------------------- reading

    def records(
        self, task: str | None = None, variant: str | None = None, window: int | None = None
    ) -> list[dict]:
        """Score records in file order (error lines excluded), optionally filtered."""
        with self._lock:
            return [
                dict(r)
                for r in self._history.items
                if "error" not in r
                and (task is None or r["task"] == task)
                and (variant is None or r["variant"] == variant)
                and (window is None or r["window"] == window)
            ]

    def errors(self) -> list[dict]:
        """Error lines in file order."""
        with self._lock:
            return [dict(r) for r in self._history.items if "error" in r]

    def drift(self) -> list[dict]:
        """The drift lines (:meth:`append_drift`) in file order."""
        with self._lock:
            return [dict(r) for r in self._drift.items]

    def last_step(self) -> int | None:
        """The largest step of any score, error, drift or examples line; None if there is none."""
        with self._lock:
            steps = [r["step"] for r in [*self._history.items, *self._drift.items]]
            for f in self._outputs.values():
                steps.extend(item["step"] for item in f.items)
            return max(steps, default=None)

    def meta(self, task: str) -> dict | None:
        """The task's meta record, or None if it was never written."""
        validate_task_name(task)
        with self._lock:
            meta = self._metas.get(task)
            return None if meta is None else dict(meta)

    def outputs(self, task: str, variant: str | None = None, window: int | None = None) -> list[dict]:
        """The task's examples lines in file order, optionally filtered. The inner lists are shared."""
        validate_task_name(task)
        with self._lock:
            f = self._outputs.get(task)
            if f is None:
                return []
            meta = self._metas.get(task)
            size = None if meta is None else len(meta["example_ids"])
            lines = []
            misfits = 0
            for item in f.items:
                if size is not None and len(item["outputs"]) != size:
                    misfits += 1  # parseable, but not about this task's examples: damaged
                elif (variant is None or item["variant"] == variant) and (
                    window is None or item["window"] == window
                ):
                    lines.append(dict(item))
            if misfits and task not in self._warned_misfits:
                self._warned_misfits.add(task)
                logger.warning(
                    "%s: skipped %d line(s) whose outputs do not match the task's %d examples",
                    f.path,
                    misfits,
                    size,
                )
            return lines

    # ---------------------------------------------------------------------------------------------- writing

    @staticmethod
    def _score_line(record: object, where: str) -> str:
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be a dict, got {type(record).__name__}")
        for key in SCORE_KEYS:
            if key not in record and key != "time":
                raise ValueError(
                    f"{where} is missing the key {key!r}; required keys: {', '.join(SCORE_KEYS)}"
                )
        for key in record:
            if key not in SCORE_KEYS and key not in OPTIONAL_SCORE_KEYS:
                allowed = ", ".join((*SCORE_KEYS, *OPTIONAL_SCORE_KEYS))
                raise ValueError(f"{where} has the unexpected key {key!r}; allowed keys: {allowed}")
        line: dict[str, object] = {
            "step": require_int(f"{where}['step']", record["step"], 0),
            "task": validate_task_name(record["task"]),
            "variant": _name(record["variant"], f"{where}['variant']"),
            "window": require_int(f"{where}['window']", record["window"], 1),
            "n_models": require_int(f"{where}['n_models']", record["n_models"], 1),
            "score": _float(record["score"], f"{where}['score']"),
            "mtv": _float(record["mtv"], f"{where}['mtv']", optional=True),
            "is": _float(record["is"], f"{where}['is']", optional=True),
            "time": _float(record.get("time", time.time()), f"{where}['time']"),
        }
        for key in OPTIONAL_SCORE_KEYS:  # added fields: readers of older releases ignore them
            if record.get(key) is not None:
                value = _float(record[key], f"{where}[{key!r}]")
                if value is None or not 0.0 <= value <= 1.0:  # shares and scores alike
                    raise ValueError(f"{where}[{key!r}] = {value!r} is not a share in [0, 1]")
                line[key] = value
        return _dumps(line)

    def append(self, record: dict) -> None:
        """Append one score record; ``time`` defaults to now. Raises ValueError on a malformed record."""
        line = self._score_line(record, "history record")
        with self._lock:
            self._history.append([line])

    def append_many(self, records: Sequence[dict]) -> None:
        """Append several score records with a single write and fsync; all are validated first."""
        if isinstance(records, (dict, str, bytes)) or not isinstance(records, Sequence):
            raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
        lines = [self._score_line(r, f"history record [{i}]") for i, r in enumerate(records)]
        if lines:
            with self._lock:
                self._history.append(lines)

    def append_error(
        self, step: int, phase: str, error: str, task: str | None = None, variant: str | None = None
    ) -> None:
        """Record a failure (``error`` is the message; non-strings are converted with ``str``)."""
        for value, name in ((task, "task"), (variant, "variant")):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        line: dict[str, object] = {
            "step": require_int("step", step, 0),
            "phase": _name(phase, "phase"),
            "task": task,
            "variant": variant,
            "error": error if isinstance(error, str) else str(error),
        }
        with self._lock:
            self._history.append([_dumps(line)])

    def append_drift(
        self,
        step: int,
        *,
        previous_step: int | None,
        previous: float | None,
        average: float | None,
        n_models: int,
    ) -> None:
        """Record how far the weights of the snapshot at ``step`` are from the snapshot at
        ``previous_step`` (``previous``: ``‖θ_t − θ_prev‖ / ‖θ_t‖``; None at the first snapshot) and from
        the average of the ``n_models`` snapshots of the window (``average``: ``‖θ_t − θ̄‖ / ‖θ_t‖``).

        Raises:
            ValueError: a step that is not an integer >= 0; a drift that is not None or a finite float >= 0.
        """
        if previous_step is not None:
            previous_step = require_int("previous_step", previous_step, 0)
        line: dict[str, object] = {
            "step": require_int("step", step, 0),
            "previous_step": previous_step,
            "previous": _float(previous, "previous", optional=True),
            "average": _float(average, "average", optional=True),
            "n_models": require_int("n_models", n_models, 1),
            "time": time.time(),
        }
        for name in ("previous", "average"):
            value = line[name]
            if value is not None and value < 0:  # type: ignore[operator]  # a float here
                raise ValueError(f"{name} drift must be >= 0, got {value!r}")
        with self._lock:
            self._drift.append([_dumps(line)])

    def write_meta(self, task: str, kind: str, metric: str, example_ids: list, targets: list) -> None:
        """Write the task's meta file once (atomically). Same content again: no-op; different: ValueError."""
        validate_task_name(task)
        _name(kind, "kind")
        _name(metric, "metric")
        meta = {
            "task": task,
            "kind": kind,
            "metric": metric,
            "example_ids": _json_value(example_ids, "example_ids"),
            "targets": _json_value(targets, "targets"),
        }
        for name in ("example_ids", "targets"):
            if not isinstance(meta[name], list):
                raise ValueError(f"{name} must be a list, got {type(meta[name]).__name__}")
        if len(meta["example_ids"]) != len(meta["targets"]):
            raise ValueError(
                f"example_ids and targets must have the same length, got {len(meta['example_ids'])} "
                f"and {len(meta['targets'])}"
            )
        text = _dumps(meta) + "\n"
        meta = json.loads(text)
        path = self._examples_dir / f"{task}{_META_SUFFIX}"
        with self._lock:
            old = self._metas.get(task)
            if old is not None:
                if old["example_ids"] != meta["example_ids"] or old["targets"] != meta["targets"]:
                    raise ValueError(
                        f"the examples of task {task!r} changed since the run directory was created "
                        f"({path} holds different example_ids/targets); results would not be comparable. "
                        "Use a new run directory (dirpath) or a new task name."
                    )
                if old["kind"] != meta["kind"] or old["metric"] != meta["metric"]:
                    raise ValueError(
                        f"task {task!r} was recorded with kind={old['kind']!r}, metric={old['metric']!r} in "
                        f"{path}, now kind={kind!r}, metric={metric!r}; use a new run directory (dirpath) "
                        "or a new task name."
                    )
                return
            if path.exists():
                logger.warning("%s: replacing a damaged meta file", path)
            atomic_write_text(path, text, inside=self._writable_root())
            self._metas[task] = meta

    def append_outputs(
        self,
        task: str,
        step: int,
        variant: str,
        window: int,
        outputs: list,
        correct: list,
        choice_logprobs: list | None = None,
    ) -> None:
        """Append the per-example results of one (step, variant, window) evaluation of ``task``.

        ``outputs``, ``correct`` and ``choice_logprobs`` are aligned with each other (and with the meta's
        ``example_ids`` when it was written); ``choice_logprobs`` entries may be ``-inf``.
        """
        validate_task_name(task)
        line: dict[str, Any] = {
            "step": require_int("step", step, 0),
            "variant": _name(variant, "variant"),
            "window": require_int("window", window, 1),
            "outputs": _json_value(outputs, "outputs"),
            "correct": _json_value(correct, "correct"),
        }
        if choice_logprobs is not None:
            line["choice_logprobs"] = _encode_logprobs(choice_logprobs, "choice_logprobs")
        for name, value in line.items():
            if name not in ("step", "variant", "window") and not isinstance(value, list):
                raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        n = len(line["outputs"])
        for name in ("correct", "choice_logprobs"):
            if name in line and len(line[name]) != n:
                raise ValueError(f"{name} has {len(line[name])} entries but outputs has {n}; they must align")
        with self._lock:
            meta = self._metas.get(task)
            if meta is not None and len(meta["example_ids"]) != n:
                raise ValueError(
                    f"outputs has {n} entries but task {task!r} has {len(meta['example_ids'])} example_ids"
                )
            f = self._outputs.get(task)
            if f is None:
                f = self._outputs[task] = _JsonlFile(
                    self._examples_dir / f"{task}{_OUTPUTS_SUFFIX}",
                    _check_outputs_line,
                    self._writable_root(),
                )
            f.append([_dumps(line)])

    def append_result(self, task, step: int, variant: str, window: int, result) -> None:
        """Append one evaluation's per-example results (``result``: a ``TaskResult``) of ``task`` (its
        ``name``, ``kind`` and ``metric``); a raw one also writes the task's meta file the first time."""
        if variant == "raw":
            self.write_meta(task.name, task.kind, task.metric, result.example_ids, result.targets)
        self.append_outputs(
            task.name, step, variant, window, result.outputs, result.correct, result.choice_logprobs
        )

    def truncate_after(self, step: int) -> int:
        """Drop every score, error, drift and examples line with a step > ``step``; return how many were
        dropped.

        Used on resume from an earlier checkpoint. Each affected file is rewritten atomically; meta files
        and damaged lines are kept.
        """
        step = require_int("step", step)  # -1 drops everything (restart from scratch)
        with self._lock:
            dropped = self._history.drop_after(step)
            dropped += self._drift.drop_after(step)
            for f in self._outputs.values():
                dropped += f.drop_after(step)
            return dropped
