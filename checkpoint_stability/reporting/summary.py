"""The paper's comparison recomputed from a run directory alone: per task, variant and window, the mean
score over the first and the final fraction of evaluations, and MTV and IS over the final fraction; with
``holdout``, also the mean confirmation-half score over the final fraction."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from checkpoint_stability.history import DRIFT_FILE, EXAMPLES_DIR, HISTORY_FILE, History, validate_task_name
from checkpoint_stability.metrics import instability_score, mean_total_variation
from checkpoint_stability.records import MEAN_TASK, VARIANTS
from checkpoint_stability.validation import is_real

logger = logging.getLogger(__name__)

MAX_STEP = 2**63 - 1
"""No optimizer step, window or model count is larger (int64); a larger one is a damaged line."""
MAX_OUTPUT_DEPTH = 32
"""Deepest nesting of lists an output may have (a tuple of token ids is one level)."""


class RunView:
    """A run's history as its readers (this summary, the report) use it: the score records, error lines,
    meta files and examples lines of a :class:`History`, without the ones they cannot use.

    :class:`History` skips what does not parse or lacks its keys. This view also leaves out lines that
    parse but would make a reader fail or mislead it, and warns once per file and kind of problem, naming
    the run's own file:

    * a score record whose task name is not a valid task name (``"../../evil"``: task names become file
      names), or whose step, window, model count or score is out of range (a score is in [0, 1]);
    * a meta file whose ``example_ids`` and ``targets`` differ in length, or hold no example;
    * an examples line whose ``correct`` is not one number in [0, 1] per output, whose outputs do not
      match the meta's examples, are not plain JSON values (or lists of them), or whose
      ``choice_logprobs`` do not hold one row of log-probabilities per output with the output a choice
      index of that row.

    * a drift line whose step or model count is beyond :data:`MAX_STEP`.

    It offers History's reading methods (``records``, ``errors``, ``meta``, ``outputs``, ``drift``), so
    whatever takes a History for reading takes a view. Nothing is written.
    """

    def __init__(self, history: History):
        self.root = Path(history.root)
        self._errors = history.errors()
        records, bad_names, out_of_range = [], [], 0
        for record in history.records():
            if not _valid_task_name(record["task"]):
                bad_names.append(record["task"])
            elif not _usable_record(record):
                out_of_range += 1
            else:
                records.append(record)
        path = self.root / HISTORY_FILE
        if bad_names:
            shown = ", ".join(_shown(name) for name in list(dict.fromkeys(bad_names))[:3])
            logger.warning(
                "%s: skipped %d score line(s) whose task name is not a valid task name (%s); they are left "
                "out (the file is not changed)",
                path,
                len(bad_names),
                shown,
            )
        if out_of_range:
            logger.warning(
                "%s: skipped %d score line(s) with a step, window or model count beyond %d or a score "
                "outside [0, 1] (damaged); they are left out (the file is not changed)",
                path,
                out_of_range,
                MAX_STEP,
            )
        self._records = records
        self._drift = _usable_drift(history.drift(), self.root / DRIFT_FILE)
        self._history = history
        # Per task, read and checked when first asked for: (meta or None, usable examples lines).
        self._tasks: dict[str, tuple[dict | None, list[dict]]] = {}

    def _task(self, task: str) -> tuple[dict | None, list[dict]]:
        if task not in self._tasks:
            if not _valid_task_name(task):
                self._tasks[task] = (None, [])
                return self._tasks[task]
            meta = self._checked_meta(self._history, task)
            lines: list[dict] = []
            problems: dict[str, int] = {}
            for line in self._history.outputs(task):
                problem = _line_problem(line, meta)
                if problem is None:
                    lines.append(line)
                else:
                    problems[problem] = problems.get(problem, 0) + 1
            if problems:
                logger.warning(
                    "%s: skipped %d examples line(s) that cannot be used (%s); they are left out (the "
                    "file is not changed)",
                    self.root / EXAMPLES_DIR / f"{task}.jsonl",
                    sum(problems.values()),
                    "; ".join(problems),
                )
            self._tasks[task] = (meta, lines)
        return self._tasks[task]

    def _checked_meta(self, history: History, task: str) -> dict | None:
        meta = history.meta(task)
        if meta is None:
            return None
        ids, targets = meta["example_ids"], meta["targets"]
        if len(ids) != len(targets) or not ids:
            logger.warning(
                "%s: the meta file holds %d example_ids and %d targets, which must be equal and not zero; "
                "it is ignored (the task's targets are unknown)",
                self.root / EXAMPLES_DIR / f"{task}.meta.json",
                len(ids),
                len(targets),
            )
            return None
        return meta

    def records(self, task: str | None = None, variant: str | None = None, window: int | None = None) -> list:
        """Score records in file order, optionally filtered (as :meth:`History.records`)."""
        return [
            dict(r)
            for r in self._records
            if (task is None or r["task"] == task)
            and (variant is None or r["variant"] == variant)
            and (window is None or r["window"] == window)
        ]

    def errors(self) -> list[dict]:
        """Error lines in file order."""
        return [dict(r) for r in self._errors]

    def drift(self) -> list[dict]:
        """The usable drift lines (``drift.jsonl``) in file order; none for a run that wrote none."""
        return [dict(line) for line in self._drift]

    def meta(self, task: str) -> dict | None:
        """The task's meta record, or None if there is none or it cannot be used."""
        meta = self._task(task)[0]
        return None if meta is None else dict(meta)

    def outputs(self, task: str, variant: str | None = None, window: int | None = None) -> list[dict]:
        """The task's usable examples lines in file order, optionally filtered."""
        return [
            dict(line)
            for line in self._task(task)[1]
            if (variant is None or line["variant"] == variant)
            and (window is None or line["window"] == window)
        ]


def as_view(run: str | os.PathLike | History | RunView) -> RunView:
    """``run`` as a :class:`RunView`: a run directory is opened read-only (nothing is created or repaired)."""
    if isinstance(run, RunView):
        return run
    if not isinstance(run, History):
        run = History(run, read_only=True)
    return RunView(run)


def _valid_task_name(name: object) -> bool:
    try:
        validate_task_name(name)
    except ValueError:
        return False
    return True


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _usable_record(record: dict) -> bool:
    return (
        record["step"] <= MAX_STEP
        and record["window"] <= MAX_STEP
        and record["n_models"] <= MAX_STEP
        and 0 <= record["score"] <= 1
    )


def _usable_drift(lines: list[dict], path: Path) -> list[dict]:
    usable = [line for line in lines if line["step"] <= MAX_STEP and line["n_models"] <= MAX_STEP]
    if len(usable) < len(lines):
        logger.warning(
            "%s: skipped %d drift line(s) with a step or model count beyond %d (damaged); they are left "
            "out (the file is not changed)",
            path,
            len(lines) - len(usable),
            MAX_STEP,
        )
    return usable


def holdout_score(record: dict, key: str) -> float | None:
    """A record's ``selection_score`` or ``confirmation_score`` (``key``), or None when it has none.

    Runs without ``holdout`` (and every run of an older release) write neither; a value that is not a
    real number in [0, 1] (a hand-edited line) counts as none.

    >>> holdout_score({"confirmation_score": 0.75}, "confirmation_score")
    0.75
    >>> holdout_score({"selection_score": "high"}, "selection_score") is None
    True
    """
    value = record.get(key)
    return float(value) if is_real(value) and 0 <= value <= 1 else None


def _is_number(value: object) -> bool:
    # JSON gives int and float (finite: History refuses NaN and Infinity); bool is a Python int.
    return type(value) in (int, float)


def _plain_output(value: Any) -> bool:
    """A JSON scalar, or lists of them nested at most MAX_OUTPUT_DEPTH deep (no objects): what the
    ensemble can vote on. Iterative, so a deep nesting cannot exhaust the stack."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, list):
            if depth >= MAX_OUTPUT_DEPTH:
                return False
            pending.extend((v, depth + 1) for v in item)
        elif item is not None and type(item) not in (bool, int, float, str):
            return False
    return True


def _line_problem(line: dict, meta: dict | None) -> str | None:
    """Why an examples line cannot be used, or None."""
    outputs, correct = line["outputs"], line["correct"]
    if line["step"] > MAX_STEP or line["window"] > MAX_STEP:
        return f"a step or window beyond {MAX_STEP}"
    if not outputs:
        return "no outputs"
    if meta is not None and len(outputs) != len(meta["example_ids"]):
        return f"outputs not one per example of the meta file's {len(meta['example_ids'])}"
    if not isinstance(correct, list) or len(correct) != len(outputs):
        return "correct not one value per output"
    if not all(_is_number(c) and 0 <= c <= 1 for c in correct):
        return "correct values that are not numbers in [0, 1]"
    if not all(_plain_output(o) for o in outputs):
        return "outputs that are not plain JSON values"
    if "choice_logprobs" in line:
        rows = line["choice_logprobs"]
        ok = isinstance(rows, list) and len(rows) == len(outputs)
        ok = ok and all(isinstance(row, list) and row and all(_is_number(v) for v in row) for row in rows)
        ok = ok and all(type(o) is int and 0 <= o < len(row) for o, row in zip(outputs, rows, strict=True))
        if not ok:
            return "choice_logprobs not one row of log-probabilities per output, indexed by it"
    return None


def final_count(total: int, final_fraction: float) -> int:
    """How many of a series' ``total`` evaluations make up its final fraction.

    ``ceil(final_fraction * total)``, but at least two (MTV and IS need two) and at most ``total``.

    >>> final_count(120, 0.2), final_count(7, 0.2), final_count(1, 0.2)
    (24, 2, 1)
    """
    if not 0 < final_fraction <= 1:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    return min(total, max(2, math.ceil(final_fraction * total)))


def series_records(history: History | RunView, task: str, variant: str, window: int) -> list[dict]:
    """The score records of one (task, variant, window) series, ordered by step.

    A step recorded twice (an analysis rerun over the same run) keeps its last record in file order.
    """
    by_step = {r["step"]: r for r in history.records(task=task, variant=variant, window=window)}
    return [by_step[step] for step in sorted(by_step)]


def series_keys(history: History | RunView, task: str) -> list[tuple[str, int]]:
    """The (variant, window) series recorded for ``task``: raw, avg, ens first, then any other variant;
    windows ascending within a variant."""
    keys = {(r["variant"], r["window"]) for r in history.records(task=task)}
    rank = {variant: i for i, variant in enumerate(VARIANTS)}
    return sorted(keys, key=lambda key: (rank.get(key[0], len(VARIANTS)), key[0], key[1]))


def summarize(
    run: str | os.PathLike | History | RunView, *, final_fraction: float = 0.2, include_mean: bool = False
) -> list[dict]:
    """One row per (task, variant, window) series: ``score_first``, ``score_last``, ``mtv``, ``is``,
    ``confirmation_last``, ``evaluations`` (how many the final fraction holds) and ``total`` (all of the
    series). ``confirmation_last`` is the mean confirmation-half score over the final fraction (runs with
    ``holdout``); None unless every record of the final fraction carries one.

    ``run`` is a run directory (read, never modified), an open :class:`History` or a :class:`RunView`;
    lines that cannot be used are left out with a warning (see :class:`RunView`). The final fraction of
    a series holds at least two evaluations (MTV and IS need two); series with fewer than two evaluations
    give no row. IS compares outputs by exact match. With ``final_fraction=1`` the row describes the
    whole run.

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
    history = as_view(run)
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
        "confirmation_last": _mean_confirmation(last),
        "evaluations": count,
        "total": len(records),
    }


def _mean_confirmation(records: list[dict]) -> float | None:
    """The mean confirmation score of ``records``; None unless each carries one (a mean over a part of
    the evaluations would not be comparable with the score next to it)."""
    values = [holdout_score(r, "confirmation_score") for r in records]
    if not values or None in values:
        return None
    return math.fsum(v for v in values if v is not None) / len(values)


def _mean_rows(history: RunView, task_rows: list[dict], tasks: list[str], final_fraction: float) -> list:
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
    """A fixed-width table of ``summarize`` rows, with each variant's MTV and IS as a ratio to raw's.

    A run with ``holdout`` gets a ``confirm., last`` column beside the scores; a table of a run without
    one looks as it always did."""
    if not rows:
        return f"{title}\nno series with two or more evaluations yet".strip()
    confirmation = any(row.get("confirmation_last") is not None for row in rows)
    width = max(12, *(len(row["task"]) for row in rows))
    header = (
        f"{'task':<{width}} {'variant':<7} {'window':>6} {'evals':>9} {'score, first':>12} "
        f"{'score, last':>11} " + (f"{'confirm., last':>14} " if confirmation else "") + f"{'MTV':>7} "
        f"{'IS':>7} {'MTV/raw':>8} {'IS/raw':>7}"
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
            + (f"{_confirmation_text(row.get('confirmation_last')):>14} " if confirmation else "")
            + f"{row['mtv']:>7.4f} {format_number(row['is'], 7)} "
            f"{format_ratio(row['mtv'], base['mtv'] if base else None, 8)} "
            f"{format_ratio(row['is'], base['is'] if base else None, 7)}"
        )
    lines.append(
        "score, first / score, last: the mean score over the first / the final evaluations of the series "
        "(as many as evals counts)."
    )
    if confirmation:
        lines.append(
            "confirm., last: the mean score over the final evaluations on the confirmation half (the "
            "examples selection never reads; holdout)."
        )
    lines.append(
        "evals: the final evaluations that score, last, MTV and IS are computed over / all evaluations."
    )
    lines.append(
        "MTV: mean change of the score between evaluations; IS: share of per-example answers that flip."
    )
    lines.append("A ratio below 1 means steadier than the live model (raw).")
    return "\n".join(lines)


def _confirmation_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_number(value: float | None, width: int = 0) -> str:
    """``value`` with 4 decimals, or ``n/a`` for None (an IS with no per-example outputs), right-aligned
    to ``width``."""
    return ("n/a" if value is None else f"{value:.4f}").rjust(width)


def format_ratio(value: float | None, base: float | None, width: int = 0) -> str:
    """``value / base`` with 2 decimals (a variant's MTV or IS relative to raw's), or ``n/a`` when either
    is missing or ``base`` is 0, right-aligned to ``width``."""
    return ("n/a" if value is None or not base else f"{value / base:.2f}").rjust(width)


def print_summary(run_dir: str | os.PathLike, *, final_fraction: float = 0.2) -> None:
    """Print :func:`format_summary` of :func:`summarize` for ``run_dir``."""
    path = Path(run_dir) / "history.jsonl"
    percent = round(100 * final_fraction)
    print(
        format_summary(
            summarize(run_dir, final_fraction=final_fraction), f"\nSummary of {path} ({percent}%):"
        )
    )
