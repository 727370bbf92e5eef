"""The paper's comparison recomputed from a run directory alone: per task, variant and window, the mean
score over the first and the final fraction of evaluations, and MTV and IS over the final fraction."""

from __future__ import annotations

import math
import os
from pathlib import Path

from checkpoint_stability.history import History
from checkpoint_stability.metrics import instability_score, mean_total_variation

VARIANTS = ("raw", "avg", "ens")
MEAN_TASK = "mean"


def final_count(total: int, final_fraction: float) -> int:
    """How many of a series' ``total`` evaluations make up its final fraction.

    ``ceil(final_fraction * total)``, but at least two (MTV and IS need two) and at most ``total``.

    >>> final_count(120, 0.2), final_count(7, 0.2), final_count(1, 0.2)
    (24, 2, 1)
    """
    if not 0 < final_fraction <= 1:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    return min(total, max(2, math.ceil(final_fraction * total)))


def series_records(history: History, task: str, variant: str, window: int) -> list[dict]:
    """The score records of one (task, variant, window) series, ordered by step.

    A step recorded twice (an analysis rerun over the same run) keeps its last record in file order.
    """
    by_step = {r["step"]: r for r in history.records(task=task, variant=variant, window=window)}
    return [by_step[step] for step in sorted(by_step)]


def series_keys(history: History, task: str) -> list[tuple[str, int]]:
    """The (variant, window) series recorded for ``task``: raw, avg, ens first, then any other variant;
    windows ascending within a variant."""
    keys = {(r["variant"], r["window"]) for r in history.records(task=task)}
    rank = {variant: i for i, variant in enumerate(VARIANTS)}
    return sorted(keys, key=lambda key: (rank.get(key[0], len(VARIANTS)), key[0], key[1]))


def summarize(
    run: str | os.PathLike | History, *, final_fraction: float = 0.2, include_mean: bool = False
) -> list[dict]:
    """One row per (task, variant, window) series: ``score_first``, ``score_last``, ``mtv``, ``is``,
    ``evaluations`` (how many the final fraction holds) and ``total`` (all of the series).

    ``run`` is a run directory or an open :class:`History`. The final fraction of a series holds at
    least two evaluations (MTV and IS need two); series with fewer than two evaluations give no row.
    IS compares outputs by exact match. With ``final_fraction=1`` the row describes the whole run.

    The aggregate task ``mean`` is left out unless ``include_mean``: its rows come last, with the score
    and MTV of the recorded mean-score series and, as in the live records, IS = the mean of the tasks'
    IS for the same variant and window (``None`` unless every task has one).

    Example::

        >>> import tempfile
        >>> from checkpoint_stability.history import History
        >>> with tempfile.TemporaryDirectory() as d:
        ...     history = History(d)
        ...     for step, score in ((1, 0.25), (2, 0.75), (3, 0.5)):
        ...         history.append_outputs("t", step, "raw", 1, [int(score > 0.3)], [score])
        ...         history.append({"step": step, "task": "t", "variant": "raw", "window": 1, "n_models": 1,
        ...                         "score": score, "mtv": None, "is": None})
        ...     [(r["score_last"], r["mtv"], r["is"]) for r in summarize(d, final_fraction=0.5)]
        [(0.625, 0.25, 0.0)]
    """
    final_count(1, final_fraction)  # validates the fraction even for an empty history
    history = run if isinstance(run, History) else History(run)
    tasks = list(dict.fromkeys(r["task"] for r in history.records() if r["task"] != MEAN_TASK))
    rows = []
    for task in tasks:
        for variant, window in series_keys(history, task):
            records = series_records(history, task, variant, window)
            if len(records) < 2:
                continue
            outputs = {line["step"]: line["outputs"] for line in history.outputs(task, variant, window)}
            row = _row(task, variant, window, records, final_fraction)
            last_outputs = [
                outputs[r["step"]] for r in records[-row["evaluations"] :] if r["step"] in outputs
            ]
            # Rows of another length cannot be compared example by example (the task's examples changed).
            last_outputs = [o for o in last_outputs if len(o) == len(last_outputs[-1])]
            row["is"] = instability_score(last_outputs) if len(last_outputs) >= 2 else None
            rows.append(row)
    if include_mean:
        rows += _mean_rows(history, rows, tasks, final_fraction)
    return rows


def _row(task: str, variant: str, window: int, records: list[dict], final_fraction: float) -> dict:
    count = final_count(len(records), final_fraction)
    first, last = records[:count], records[-count:]
    return {
        "task": task,
        "variant": variant,
        "window": window,
        "score_first": math.fsum(r["score"] for r in first) / len(first),
        "score_last": math.fsum(r["score"] for r in last) / len(last),
        "mtv": mean_total_variation([r["score"] for r in last]),
        "is": None,
        "evaluations": count,
        "total": len(records),
    }


def _mean_rows(history: History, task_rows: list[dict], tasks: list[str], final_fraction: float) -> list:
    rows = []
    for variant, window in series_keys(history, MEAN_TASK):
        records = series_records(history, MEAN_TASK, variant, window)
        if len(records) < 2:
            continue
        row = _row(MEAN_TASK, variant, window, records, final_fraction)
        iss = [r["is"] for r in task_rows if (r["variant"], r["window"]) == (variant, window)]
        if len(iss) == len(tasks) and None not in iss:
            row["is"] = math.fsum(iss) / len(iss)
        rows.append(row)
    return rows


def format_summary(rows: list[dict], title: str = "") -> str:
    """A fixed-width table of ``summarize`` rows, with each variant's MTV and IS as a ratio to raw's."""
    if not rows:
        return f"{title}\nno series with two or more evaluations yet".strip()
    width = max(12, *(len(row["task"]) for row in rows))
    header = (
        f"{'task':<{width}} {'variant':<7} {'window':>6} {'evals':>9} {'score, first':>12} "
        f"{'score, last':>11} {'MTV':>7} {'IS':>7} {'MTV/raw':>8} {'IS/raw':>7}"
    )
    raw = {row["task"]: row for row in rows if row["variant"] == "raw"}
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for row in rows:
        base = raw.get(row["task"])
        evals = f"{row['evaluations']}/{row['total']}"
        lines.append(
            f"{row['task']:<{width}} {row['variant']:<7} {row['window']:>6} {evals:>9} "
            f"{row['score_first']:>12.3f} {row['score_last']:>11.3f} "
            f"{row['mtv']:>7.4f} {_number(row['is'], '>7.4f')} "
            f"{_ratio(row['mtv'], base and base['mtv'])} {_ratio(row['is'], base and base['is'], 7)}"
        )
    lines.append(
        "evals: the final evaluations that score, last, MTV and IS are computed over / all evaluations."
    )
    lines.append(
        "MTV: mean change of the score between evaluations; IS: share of per-example answers that flip."
    )
    lines.append("A ratio below 1 means steadier than the live model (raw).")
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    width = int(spec[1 : spec.index(".")])
    return f"{'n/a':>{width}}" if value is None else format(value, spec)


def _ratio(value: float | None, base: float | None, width: int = 8) -> str:
    if value is None or not base:
        return f"{'n/a':>{width}}"
    return f"{value / base:>{width}.2f}"


def print_summary(run_dir: str | os.PathLike, *, final_fraction: float = 0.2) -> None:
    """Print :func:`format_summary` of :func:`summarize` for ``run_dir``."""
    path = Path(run_dir) / "history.jsonl"
    percent = round(100 * final_fraction)
    print(
        format_summary(
            summarize(run_dir, final_fraction=final_fraction), f"\nSummary of {path} ({percent}%):"
        )
    )
