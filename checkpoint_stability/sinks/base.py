"""The sink contract and the scalar naming shared by every sink.

Logged scalar names are a fixed contract that dashboards and reports rely on::

    stability/<task>/<variant>/score
    stability/<task>/<variant>/mtv   (only when the record's mtv is not None)
    stability/<task>/<variant>/is    (only when the record's is is not None)

where ``<task>`` includes the cross-task aggregate ``"mean"`` and ``<variant>`` is one of
``raw``, ``avg``, ``ens``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from checkpoint_stability.records import MEAN_TASK, METRICS, VARIANTS, scalar_name


@runtime_checkable
class Sink(Protocol):
    """Destination for the evaluation records of one snapshot step.

    Sinks are called on rank 0 only, once per snapshot step, with all the records of that
    step. A sink must never be allowed to break training, but that is the caller's job: the
    caller wraps every call and reports failures. A sink should therefore raise on real
    errors (bad records, unwritable directory) rather than swallow them, so they get reported.

    Example::

        class ListSink:
            def __init__(self):
                self.rows = []

            def write(self, step, records):
                self.rows.extend(records)

            def close(self):
                pass

        sink: Sink = ListSink()
        sink.write(500, [{"step": 500, "task": "mean", "variant": "raw", "score": 0.41, ...}])
        sink.close()
    """

    def write(self, step: int, records: list[dict]) -> None:
        """Record all results of snapshot ``step``."""
        ...

    def close(self) -> None:
        """Flush and release resources; called once at the end of training."""
        ...

    # Optional: ``run_ended(self) -> object``, called once on rank 0 when a run finishes with
    # ``close()`` (not when it is abandoned or reopened), after the last ``write``: end-of-run work
    # such as the report (ReportSink). A failure there is reported as a "report" fault.
    # Optional: ``best_changed(self, step, best, export) -> None``, called on rank 0 when the selected
    # best model changed at snapshot ``step``: ``best`` is the new content of ``best.json``, ``export``
    # the absolute path of its exported model (None for an ensemble). TensorBoard's ``best`` run and
    # W&B's summary use it. A failure there is reported as a "sink" fault.


def _variant_rank(variant: object) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"record variant must be one of {list(VARIANTS)}, got {variant!r}")
    return VARIANTS.index(variant)


def scalar_items(records: Iterable[dict]) -> dict[str, float]:
    """Map the records of a step to ``{logged name: value}``.

    Metrics whose value is None (mtv/is before the window holds enough models) are skipped.
    Tasks keep the order in which they first appear; within a task, variants are ordered
    raw, avg, ens so every sink logs in the same order.

    Example::

        >>> scalar_items([{"task": "mean", "variant": "raw", "score": 0.5, "mtv": None, "is": 0.1}])
        {'stability/mean/raw/score': 0.5, 'stability/mean/raw/is': 0.1}
    """
    task_order: dict[str, int] = {}
    keyed: list[tuple[int, int, dict]] = []
    for record in records:
        task = record.get("task")
        if not isinstance(task, str) or not task:
            raise ValueError(f"record task must be a non-empty string, got {task!r}")
        task_order.setdefault(task, len(task_order))
        keyed.append((task_order[task], _variant_rank(record.get("variant")), record))

    items: dict[str, float] = {}
    for _, _, record in sorted(keyed, key=lambda k: (k[0], k[1])):
        for metric in METRICS:
            value = record.get(metric)
            if value is None:
                continue
            name = scalar_name(record["task"], record["variant"], metric)
            # Two records for the same task/variant would silently overwrite one another.
            if name in items:
                raise ValueError(
                    f"records must hold one record per (task, variant), got a duplicate for {name!r}"
                )
            items[name] = float(value)
    return items


def layout_task_names(task_names: Sequence[str]) -> list[str]:
    """``task_names`` with the aggregate ``"mean"`` first and duplicates dropped."""
    # A bare string is a Sequence[str] too, and would silently become one task per character.
    if isinstance(task_names, (str, bytes)):
        raise ValueError(f"task_names must be a sequence of task names, not a single string: {task_names!r}")
    names: list[str] = [MEAN_TASK]
    for task in task_names:
        if not isinstance(task, str) or not task:
            raise ValueError(f"task_names must contain non-empty strings, got {task!r}")
        if task not in names:
            names.append(task)
    return names
