"""The Task protocol every downstream evaluation follows, and TaskResult, what one evaluation returns."""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from checkpoint_stability.validation import is_real

RESERVED_TASK_NAMES = ("mean",)
MAX_TASK_NAME_BYTES = 200
"""The longest task name, in UTF-8 bytes: ``.<task>.meta.json.tmp-<pid>`` must stay under 255 bytes."""


@dataclass
class TaskResult:
    """Per-example results of evaluating one model on one task.

    ``outputs[i]`` is example ``i``'s prediction in a form that can be compared for equality and
    written to JSON (a choice index, a token id, a normalised string); ``correct[i]`` its score in
    [0, 1]; ``targets[i]`` the reference (label index or string); ``choice_logprobs[i][c]`` the
    log-probability of choice ``c`` after the task's own length normalisation, if any (multiple-choice
    tasks; ``None`` otherwise). The ensemble's ``mean_prob`` and the vote's tie-break use them as given.
    """

    outputs: list
    correct: list[float]
    targets: list
    example_ids: list
    choice_logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.outputs)
        for name in ("correct", "targets", "example_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TaskResult.{name} has {len(getattr(self, name))} entries, outputs has {n}")
        if self.choice_logprobs is not None and len(self.choice_logprobs) != n:
            raise ValueError(
                f"TaskResult.choice_logprobs has {len(self.choice_logprobs)} entries, outputs has {n}"
            )
        if n == 0:
            raise ValueError("TaskResult has no examples")
        for i, value in enumerate(self.correct):
            if not is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"TaskResult.correct[{i}] = {value!r} is not a number in [0, 1]")

    @property
    def score(self) -> float:
        """The task score: the mean of the per-example scores."""
        return math.fsum(self.correct) / len(self.correct)


@runtime_checkable
class Task(Protocol):
    """What the monitor needs from a downstream task.

    ``name`` is used in logged names and file names; ``kind`` (e.g. ``"multiple_choice"``) and
    ``metric`` (``"accuracy"``, ``"exact_match"``, ``"char_f1"``) are plain strings saved with the run so
    a report can re-score outputs from the run directory alone. ``evaluate`` runs the model;
    ``score`` scores any outputs against the task's own targets without running anything, which is
    how the combined outputs of an ensemble are scored.
    """

    name: str
    kind: str
    metric: str

    def evaluate(self, model: torch.nn.Module) -> TaskResult: ...

    def score(self, outputs: Sequence) -> list[float]: ...


def validate_task_name(name: Any, *, allow_reserved: bool = False) -> str:
    """Task names appear in logged keys and file names: keep them plain.

    ``"mean"`` names the aggregate over tasks, so a user task may not take it (``allow_reserved`` is for
    readers of aggregate records). The limit is in bytes, not characters: a file name holds at most
    255 bytes on common file systems, and ``examples/<task>.meta.json`` (or its temporary twin) must fit,
    so ``"字" * 100`` (300 bytes in UTF-8) is refused here rather than by every write of the run.

    Example::

        >>> validate_task_name("hellaswag")
        'hellaswag'
        >>> validate_task_name("字" * 100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: task name '字字字...' is 300 bytes in UTF-8; at most 200 bytes are allowed ...
    """
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"task name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in RESERVED_TASK_NAMES and not allow_reserved:
        raise ValueError(f"task name {name!r} is reserved for the mean over tasks; choose another name")
    if name.startswith(".") or any(c in name for c in ("/", "\\", "\0", os.sep, os.altsep or "/")):
        raise ValueError(
            f"task name {name!r} is not allowed: it must not start with '.' or contain '/', '\\' or NUL"
        )
    control = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if control is not None:
        raise ValueError(
            f"task name {name!r} contains the control character {control!r}; task names name files and "
            "log keys, so only printable characters are allowed"
        )
    size = len(name.encode("utf-8"))
    if size > MAX_TASK_NAME_BYTES:
        shown = name if len(name) <= 20 else name[:3] + "..."
        raise ValueError(
            f"task name {shown!r} is {size} bytes in UTF-8; at most {MAX_TASK_NAME_BYTES} bytes are allowed "
            "(it names files)"
        )
    return name


def validate_example_ids(task: str, example_ids: Sequence | None, count: int) -> list:
    """One JSON-serialisable, unique id per example (default ``0..count-1``); they name examples on disk."""
    if example_ids is None:
        return list(range(count))
    example_ids = list(example_ids)
    if len(example_ids) != count:
        raise ValueError(f"task {task!r}: {len(example_ids)} example_ids for {count} examples")
    keys = []
    for index, value in enumerate(example_ids):
        try:
            keys.append(json.dumps(value, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"task {task!r}: example id of example {index} is not JSON-serialisable"
            ) from error
    if len(set(keys)) != count:
        raise ValueError(f"task {task!r}: example_ids are not unique")
    return example_ids


def validate_tasks(tasks: Sequence[Task]) -> list[Task]:
    """Check every task follows the protocol and names are unique; returns them as a list."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise ValueError(f"tasks must be a list of Task objects (or [] for none), got {type(tasks).__name__}")
    seen: set[str] = set()
    for index, task in enumerate(tasks):
        for attribute in ("name", "kind", "metric", "evaluate", "score"):
            if not hasattr(task, attribute):
                raise ValueError(
                    f"tasks[{index}] ({type(task).__name__}) is not a Task: it has no {attribute!r}; "
                    "wrap a plain function in checkpoint_stability.tasks.FunctionTask"
                )
        validate_task_name(task.name)
        if task.name in seen:
            raise ValueError(f"two tasks are named {task.name!r}; task names must be unique")
        seen.add(task.name)
    return list(tasks)


def plain_value(value: Any) -> Any:
    """An output or target as plain Python values, which compare by equality as JSON will store them:
    lists and tuples become lists (walked), a one-element tensor or a numpy scalar its Python scalar, a
    larger tensor a nested list; anything else is returned as it is.

    >>> import numpy as np, torch
    >>> plain_value((np.int64(3), torch.tensor([1, 2]), torch.tensor(0.5), "a"))
    [3, [1, 2], 0.5, 'a']
    """
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
