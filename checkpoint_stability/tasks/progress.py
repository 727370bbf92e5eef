"""A progress bar for a task's evaluation loop that stays out of the way.

Evaluations at every snapshot are usually short, and a bar that flashes up for half a second at every
snapshot is noise in a training log. So the bar (``tqdm``, on stderr) appears only once an evaluation
has run for ``delay`` seconds (2 by default), only on rank 0 (every rank runs the same loop; one bar is
enough), and never for a loop of one or two steps. Without ``tqdm`` installed it is silent.

Tasks use it around their batch loops::

    with progress(len(batches), f"task {self.name!r}") as bar:
        for batch in batches:
            ...
            bar.update(1)
"""

from __future__ import annotations

import sys
from types import TracebackType

from checkpoint_stability.tasks.sharding import rank_and_world
from checkpoint_stability.validation import is_real, require_int

DEFAULT_DELAY = 2.0
"""Seconds an evaluation runs before its bar appears."""

MIN_TOTAL = 3
"""Loops with fewer steps than this never show a bar: there is no progress to watch in them."""


class Progress:
    """A progress counter that may or may not be drawn; ``update`` is cheap either way.

    Use :func:`progress` to make one. ``shown`` tells whether a bar is attached (it still waits for
    ``delay`` seconds before drawing anything).

    Example::

        >>> with progress(10, "toy", enabled=False) as bar:
        ...     for _ in range(10):
        ...         bar.update(1)
        >>> bar.n, bar.shown
        (10, False)
    """

    def __init__(self, bar=None):
        self._bar = bar
        self.n = 0

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def progress(
    total: int,
    description: str,
    *,
    enabled: bool = True,
    delay: float = DEFAULT_DELAY,
    unit: str = "it",
) -> Progress:
    """A :class:`Progress` over ``total`` steps, drawn as a tqdm bar on stderr when it is worth it.

    Args:
        total: the number of steps the loop will report with ``update``.
        description: the bar's label, e.g. the task's name.
        enabled: ``False`` for no bar at all.
        delay: seconds before the bar first appears; an evaluation that ends sooner leaves no trace
            on the terminal. ``0`` shows it at once.
        unit: what one step is (``"batch"``, ``"example"``...).

    No bar is drawn (the returned object only counts) when ``enabled`` is false, on a rank other
    than 0, when ``total`` is below :data:`MIN_TOTAL`, or when ``tqdm`` is not installed.
    """
    total = require_int("total", total, 0, where="progress")
    if not is_real(delay) or delay < 0:
        raise ValueError(f"progress: delay must be a number of seconds >= 0, got {delay!r}")
    if not enabled or total < MIN_TOTAL or rank_and_world()[0] != 0:
        return Progress()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a missing bar is no reason to fail an evaluation
        return Progress()
    bar = tqdm(
        total=total,
        desc=description,
        unit=unit,
        delay=delay,
        # sys.stderr is looked up now, not at import, so a redirected stderr (pytest, a logger) is honoured.
        file=sys.stderr,
        # Shown even when stderr is not a terminal (a log file, a notebook): the delay already keeps
        # short evaluations quiet, and a long one is exactly when someone tails the log.
        disable=False,
        # Transient: once the evaluation ends, its bar gives way to the monitor's one-line summary.
        leave=False,
        dynamic_ncols=True,
    )
    return Progress(bar)
