"""The paper's comparison recomputed from a run directory alone: per task and variant, the mean score
over the first and the final fraction of evaluations, and MTV and IS over the final fraction."""

from __future__ import annotations

import math
import os
from pathlib import Path

from checkpoint_stability.history import History
from checkpoint_stability.metrics import instability_score, mean_total_variation

VARIANTS = ("raw", "avg", "ens")


def summarize(run_dir: str | os.PathLike, *, final_fraction: float = 0.2) -> list[dict]:
    """One row per (task, variant): ``score_first``, ``score_last``, ``mtv``, ``is``, ``evaluations``.

    The final fraction of a series holds at least two evaluations (MTV and IS need two). The aggregate
    task ``mean`` is left out; series with fewer than two evaluations give no row.

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
    if not 0 < final_fraction <= 1:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    history = History(run_dir)
    tasks = list(dict.fromkeys(r["task"] for r in history.records() if r["task"] != "mean"))
    rows = []
    for task in tasks:
        for variant in VARIANTS:
            records = sorted(history.records(task=task, variant=variant), key=lambda r: r["step"])
            if len(records) < 2:
                continue
            outputs = {line["step"]: line["outputs"] for line in history.outputs(task, variant=variant)}
            count = min(len(records), max(2, math.ceil(final_fraction * len(records))))
            first, last = records[:count], records[-count:]
            last_outputs = [outputs[r["step"]] for r in last if r["step"] in outputs]
            rows.append(
                {
                    "task": task,
                    "variant": variant,
                    "score_first": sum(r["score"] for r in first) / len(first),
                    "score_last": sum(r["score"] for r in last) / len(last),
                    "mtv": mean_total_variation([r["score"] for r in last]),
                    "is": instability_score(last_outputs) if len(last_outputs) >= 2 else None,
                    "evaluations": len(last),
                    "total": len(records),
                }
            )
    return rows


def format_summary(rows: list[dict], title: str = "") -> str:
    """A fixed-width table of ``summarize`` rows, with each variant's MTV and IS as a ratio to raw's."""
    if not rows:
        return f"{title}\nno series with two or more evaluations yet".strip()
    header = (
        f"{'task':<12} {'variant':<7} {'score, first':>12} {'score, last':>11} "
        f"{'MTV':>7} {'IS':>7} {'MTV/raw':>8} {'IS/raw':>7}"
    )
    raw = {row["task"]: row for row in rows if row["variant"] == "raw"}
    lines = [title] if title else []
    first = rows[0]
    lines.append(f"(last {first['evaluations']} of {first['total']} evaluations for MTV and IS)")
    lines += [header, "-" * len(header)]
    for row in rows:
        base = raw.get(row["task"])
        lines.append(
            f"{row['task']:<12} {row['variant']:<7} {row['score_first']:>12.3f} {row['score_last']:>11.3f} "
            f"{row['mtv']:>7.4f} {_number(row['is'], '>7.4f')} "
            f"{_ratio(row['mtv'], base and base['mtv'])} {_ratio(row['is'], base and base['is'], 7)}"
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
