"""Argument checks every layer shares: integers (never a bool), real numbers, sequences of values.

Python counts ``True`` as the integer 1; a bool where a count, a step or a score belongs is a caller
bug, so these checks refuse it. numpy integers and floats are accepted and come back as Python ones
(``is_int`` and ``is_real`` tell a type checker ``int`` and ``float``, which is what they are used as).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """An integer (Python or numpy), and not a bool.

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> TypeGuard[float]:
    """A real number (int or float, Python or numpy; NaN and infinities included), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(
    name: str, value: Any, minimum: int | None = None, *, optional: bool = False, where: str = ""
) -> Any:
    """``value`` as a Python int, checked; ``None`` passes through when ``optional``.

    The error reads ``"{where}: {name} must be [None or ]an integer[ >= minimum], got {value!r}"``.

    >>> require_int("window", 3, 1)
    3
    >>> require_int("batch_size", 0, 1, where="task 'qa'")
    Traceback (most recent call last):
    ...
    ValueError: task 'qa': batch_size must be an integer >= 1, got 0

    Raises:
        ValueError: not an integer (a bool is not), or below ``minimum``.
    """
    if value is None and optional:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        allowed = "None or an integer" if optional else "an integer"
        if minimum is not None:
            allowed += f" >= {minimum}"
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be {allowed}, got {value!r}")
    return int(value)


def as_list(values: Any, name: str) -> list:
    """``values`` as a list; a str or bytes is refused (iterable, but where a sequence of scores,
    outputs or snapshots belongs, a caller bug).

    Raises:
        ValueError: ``"{name} must be a sequence, got {type}"``.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence, got {type(values).__name__}")
    return list(values)
