"""A Markdown report with PNG plots, written from a run directory alone (at train end, and by the CLI).

``write_report(run_dir)`` reads ``history.jsonl``, ``examples/``, ``best.json`` and ``drift.jsonl`` and
writes ``<run_dir>/report/``:

* ``report.md`` — the run at a glance; the best model that ``best.json`` names (step, variant, the
  snapshots combined, its scores, its export and how to load it); whether that choice holds up on the
  examples selection never read (``best.json``'s ``evidence``: the chosen, naive, final raw and best
  candidate models, the regret, bootstrap intervals); a table of score, MTV and IS per task, variant and
  window over the final 20% of evaluations (the paper's protocol) and over the whole run, with the
  confirmation-half score beside each score when the run had a ``holdout``; the ensemble window-size
  sweep; the recommended window (:func:`~checkpoint_stability.diagnostics.recommend_window` per task,
  for the vote ensemble and for averages at several windows); the weight drift and the windows that
  span a jump in it; the error lines, if any. A run that records none of selection evidence, holdout
  scores and drift (an older release's) gets the report it always got;
* ``scores-<task>.png`` — each task's score over steps for raw, avg and ens, the best model's step marked
  (and ``scores-mean.png``, the mean over tasks, when there are several tasks: over one task the mean is
  that task);
* ``flips-<task>.png`` — which examples change their score over the last evaluations, raw beside avg
  and ens;
* ``window-sweep.png`` — the vote ensemble of the last ``n`` raw evaluations, n = 1, 2, 5, 10, 20,
  recomputed from the cached per-example outputs and the targets in ``examples/<task>.meta.json``: no
  model, no forward pass;
* ``weight-drift.png`` — how far the weights moved at each snapshot, from the previous snapshot and
  from the window's average, jumps marked (runs with ``drift.jsonl``).

The report is built in a temporary sibling directory and swapped in with renames, so a crash leaves the
previous report or the new one, never half of one. The run directory is only read: its history is opened
read-only (``History(run_dir, read_only=True)``), which repairs nothing — a torn last line must not be cut
off under a training run still appending to the same files — and warns about damaged lines naming the
run's own files. Lines that parse but cannot be used (a task name that is not a valid task name, an
examples line whose ``correct`` holds strings) are left out with one warning per file
(:class:`~checkpoint_stability.reporting.summary.RunView`). Every file the report writes is a new
regular file in its own directory, opened without following links, and a report directory that is a
link or a file is refused: a task name cannot lead a plot out of ``report/``.

matplotlib is an optional extra (``pip install checkpoint-stability[report]``). Figures are drawn on
their own Agg canvases, so a user's interactive backend and pyplot state are left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.bootstrap import Interval, paired_difference
from checkpoint_stability.diagnostics import collapsed, recommend_window
from checkpoint_stability.ensemble import vote
from checkpoint_stability.history import DRIFT_FILE, EXAMPLES_DIR, HISTORY_FILE, History
from checkpoint_stability.holdout import split
from checkpoint_stability.metrics import TASK_METRICS, exact_match, instability_score, mean_total_variation
from checkpoint_stability.records import BIAS_FIELDS, MEAN_TASK, VARIANTS
from checkpoint_stability.reporting.summary import (
    RunView,
    as_view,
    final_count,
    format_number,
    format_ratio,
    holdout_score,
    series_keys,
    series_records,
    summarize,
)
from checkpoint_stability.selection import BEST_FILE, read_best
from checkpoint_stability.storage.atomic_files import fsync_directory
from checkpoint_stability.storage.confinement import UnsafePathError, open_confined
from checkpoint_stability.validation import is_int, is_real

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.md"
FINAL_FRACTION = 0.2
SWEEP_WINDOWS = (1, 2, 5, 10, 20)
FLIP_EVALUATIONS = 20
"""How many of the last evaluations the flip heatmaps show."""
MAX_FLIP_ROWS = 40
"""Most examples a heatmap shows (those that change most often); more would not be readable."""
MAX_ERRORS_LISTED = 10
RESAMPLES = 1000
"""Bootstrap resamples of the report's own paired intervals (the window recommendation)."""
SEED = 0
"""Seed of those resamples: the same run gives the same intervals on every machine."""
WINDOW_TOLERANCE = 0.1
"""How far above the lowest MTV a recommended window's MTV may be (``recommend_window``'s tolerance)."""
JUMP_FACTOR = 3.0
"""A snapshot's move from the previous one is a jump above this many times the run's median move."""
MIN_DRIFT_VALUES = 5
"""Fewest moves between snapshots whose median can say what a jump is."""
MAX_STEPS_LISTED = 20
"""Most jumps (and runs of windows spanning them) the drift note names; the plot shows them all."""
INSTALL_HINT = "pip install checkpoint-stability[report]"


def write_report(run_dir: str | os.PathLike, *, output_dir: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` and its PNG plots for the run in ``run_dir``; return the path of ``report.md``.

    ``output_dir`` defaults to ``<run_dir>/report``. An existing report there is replaced as a whole
    (stale plots of renamed tasks go too); a directory that holds anything besides ``report.md`` and
    PNGs is refused rather than deleted, and so is a symlink or a file in its place. A run without any
    score record yet gets a short report saying so. The run directory itself is never modified; lines it
    holds that cannot be used are left out, with a warning naming their file.

    Example::

        >>> import tempfile
        >>> from checkpoint_stability.history import History
        >>> with tempfile.TemporaryDirectory() as d:
        ...     history = History(d)
        ...     history.write_meta("t", kind="function", metric="exact_match", example_ids=[0, 1],
        ...                        targets=["a", "b"])
        ...     for step, outputs in ((10, ["a", "a"]), (20, ["a", "b"]), (30, ["b", "b"])):
        ...         correct = [float(o == t) for o, t in zip(outputs, ["a", "b"])]
        ...         history.append_outputs("t", step, "raw", 1, outputs, correct)
        ...         history.append({"step": step, "task": "t", "variant": "raw", "window": 1,
        ...                         "n_models": 1, "score": sum(correct) / 2, "mtv": None, "is": None})
        ...     path = write_report(d)
        ...     sorted(p.name for p in path.parent.iterdir())
        ['flips-t.png', 'report.md', 'scores-t.png', 'window-sweep.png']

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no ``history.jsonl``.
        ValueError: ``output_dir`` exists and is not a report directory (``UnsafePathError``, a
            ``ValueError``, when it is a symlink).
        ImportError: matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    _require_matplotlib()
    target = Path(output_dir) if output_dir is not None else run_dir / REPORT_DIR
    _check_replaceable(target)
    history = RunView(History(run_dir, read_only=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()  # not mkdtemp: its mode 0700 would become the report's, unreadable to others
    try:
        _ReportWriter(history, run_dir, staging).write()
        _fsync_files(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / REPORT_FILE


# ----------------------------------------------------------------------------------------------- the numbers


def score_outputs(outputs: Sequence, targets: Sequence, metric: str) -> list[float]:
    """Score outputs against a task's stored targets as the library's tasks do, by the metric's name.

    ``"char_f1"`` is :func:`~checkpoint_stability.metrics.char_f1`; every other metric (accuracy,
    exact_match, lm-eval's acc / acc_norm / acc_bytes) is exact equality, the way those tasks score a
    chosen index or a normalised string. A list target holds several accepted answers (generation,
    multi-target multiple choice): the best match counts.

    >>> score_outputs([1, 0, "ab"], [1, [2, 3], ["x", "ba"]], "exact_match")
    [1.0, 0.0, 0.0]
    >>> score_outputs(["ab"], [["x", "ba"]], "char_f1")
    [1.0]
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    similarity = TASK_METRICS.get(metric, exact_match)
    scores = []
    for output, target in zip(outputs, targets, strict=True):
        answers = target if isinstance(target, list) and not isinstance(output, list) else [target]
        # A list of no accepted answers matches nothing.
        scores.append(max((float(similarity(output, answer)) for answer in answers), default=0.0))
    return scores


def window_sweep(
    history: History | RunView,
    task: str,
    windows: Sequence[int] = SWEEP_WINDOWS,
    *,
    final_fraction: float = FINAL_FRACTION,
) -> list[dict]:
    """The vote ensemble of the last ``n`` raw evaluations at each step, for each ``n`` in ``windows``.

    One row per ``n`` (those above the number of raw evaluations are left out): ``score`` (mean over the
    final evaluations), ``mtv`` and ``is`` (over the same evaluations), ``evaluations`` and ``total``.
    The vote breaks ties as the live ensemble does (summed log-probabilities where they were stored, else
    the newest snapshot); its outputs are scored with :func:`score_outputs` against the task's stored
    targets. ``n = 1`` reproduces the raw series. Fewer than two raw evaluations give no rows.

    ``history`` is read through a :class:`~checkpoint_stability.reporting.summary.RunView` (lines that
    cannot be used are left out).

    Raises:
        ValueError: the task has no usable meta file (its targets are unknown), or its stored
            log-probabilities disagree between evaluations on an example's number of choices.
    """
    meta, lines = _sweep_lines(as_view(history), task)
    if len(lines) < 2:
        return []
    count = final_count(len(lines), final_fraction)
    rows = []
    for n in windows:
        if n > len(lines):
            continue
        combined, per_example = _voted_final(lines, meta, n, count)
        scores = [math.fsum(values) / len(values) for values in per_example]
        rows.append(
            {
                "n": n,
                "score": math.fsum(scores) / len(scores),
                "mtv": mean_total_variation(scores),
                "is": instability_score(combined),
                "evaluations": count,
                "total": len(lines),
            }
        )
    return rows


def _sweep_lines(history: RunView, task: str) -> tuple[dict, list[dict]]:
    """The task's meta and its raw examples lines by step, those with one output per example of the meta.

    Raises:
        ValueError: the task has no usable meta file (its targets are unknown).
    """
    meta = history.meta(task)
    if meta is None:
        raise ValueError(
            f"task {task!r} has no usable {EXAMPLES_DIR}/{task}.meta.json: its targets are unknown"
        )
    size = len(meta["targets"])
    return meta, [line for line in _series_lines(history, task, "raw", 1) if len(line["outputs"]) == size]


def _voted_final(lines: list[dict], meta: dict, n: int, count: int) -> tuple[list[list], list[list[float]]]:
    """At each of the last ``count`` of ``lines``: the vote of that line and the ``n - 1`` before it, and
    the vote's per-example scores against the meta's targets. ``n = 1`` is the raw outputs re-scored."""
    combined, per_example = [], []
    for end in range(len(lines) - count, len(lines)):
        outputs = _vote_lines(lines[max(0, end - n + 1) : end + 1])
        combined.append(outputs)
        per_example.append(score_outputs(outputs, meta["targets"], meta["metric"]))
    return combined, per_example


def _series_lines(history: RunView, task: str, variant: str, window: int) -> list[dict]:
    """Examples lines of one series ordered by step; a step written twice keeps its last line."""
    by_step = {line["step"]: line for line in history.outputs(task, variant, window)}
    return [by_step[step] for step in sorted(by_step)]


def _vote_lines(lines: list[dict]) -> list:
    outputs = [[_hashable(o) for o in line["outputs"]] for line in lines]
    logprobs = None
    if all("choice_logprobs" in line for line in lines):
        logprobs = [line["choice_logprobs"] for line in lines]
    return [_unhashable(o) for o in vote(outputs, logprobs)]


def _hashable(value: Any) -> Any:
    # JSON turns a tuple output into a list; the vote counts outputs in a dict, so turn it back.
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _unhashable(value: Any) -> Any:
    return [_unhashable(v) for v in value] if isinstance(value, tuple) else value


def _rescoring_mismatch(history: RunView, task: str) -> float:
    """Share of stored raw per-example scores that re-scoring from meta.json does not reproduce."""
    meta = history.meta(task)
    if meta is None:
        return 0.0
    differ = total = 0
    for line in history.outputs(task, "raw", 1):
        if len(line["outputs"]) != len(meta["targets"]):
            continue
        rescored = score_outputs(line["outputs"], meta["targets"], meta["metric"])
        differ += sum(abs(a - b) > 1e-9 for a, b in zip(rescored, line["correct"], strict=True))
        total += len(rescored)
    return differ / total if total else 0.0


def ensemble_window_rows(
    history: History | RunView,
    task: str,
    *,
    examples: Sequence[int] | None = None,
    windows: Sequence[int] = SWEEP_WINDOWS,
    final_fraction: float = FINAL_FRACTION,
) -> list[dict]:
    """Rows for :func:`~checkpoint_stability.diagnostics.recommend_window` from the ensemble sweep: the vote
    of the last ``n`` raw evaluations, for each ``n`` :func:`window_sweep` computes.

    Each row is ``{"n", "mtv", "score", "confirmation_diff"}``: ``mtv`` and ``score`` as in the sweep (over
    the final evaluations, all examples); ``confirmation_diff`` the paired bootstrap interval
    (:func:`~checkpoint_stability.bootstrap.paired_difference`, :data:`RESAMPLES` resamples, seed
    :data:`SEED`, ``.to_json()``) of ens − raw over the examples whose indices ``examples`` lists (None:
    all), where an example's value is the mean of its score over the same final evaluations. raw is
    ``n = 1`` scored the same way (the stored outputs re-scored against the meta's targets), so the two
    sides differ only by the vote.

    Raises:
        ValueError: as :func:`window_sweep`.
    """
    meta, lines = _sweep_lines(as_view(history), task)
    if len(lines) < 2:
        return []
    count = final_count(len(lines), final_fraction)
    raw = _example_means(_voted_final(lines, meta, 1, count)[1], examples)
    rows = []
    for n in windows:
        if n > len(lines):
            continue
        per_example = _voted_final(lines, meta, n, count)[1]
        scores = [math.fsum(values) / len(values) for values in per_example]
        difference = paired_difference(
            _example_means(per_example, examples), raw, resamples=RESAMPLES, seed=SEED
        )
        rows.append(
            {
                "n": n,
                "mtv": mean_total_variation(scores),
                "score": math.fsum(scores) / len(scores),
                "confirmation_diff": difference.to_json(),
            }
        )
    return rows


def average_window_rows(
    history: History | RunView,
    task: str,
    *,
    examples: Sequence[int] | None = None,
    final_fraction: float = FINAL_FRACTION,
) -> list[dict]:
    """Rows for :func:`~checkpoint_stability.diagnostics.recommend_window` from the avg series the history
    holds at several windows (``analyze`` with several ``windows``), with ``n = 1`` the raw series.

    Only the steps every one of these series (raw included) was evaluated at are used, so that the rows
    compare like with like; of those, the final ones (:func:`final_count`). Each row is ``{"n", "mtv",
    "score", "confirmation_diff"}``: the MTV and the mean of the recorded scores over the final steps,
    and the paired interval of avg − raw as in :func:`ensemble_window_rows`, from the stored per-example
    ``correct`` of the examples lines; ``confirmation_diff`` is None when a series lacks a usable
    examples line at one of those steps. Fewer than two avg windows (a live run evaluates one), or fewer
    than two shared steps, give no rows.
    """
    history = as_view(history)
    windows = sorted(w for v, w in series_keys(history, task) if v == "avg" and w > 1)
    if len(windows) < 2:
        return []
    series = {1: ("raw", series_records(history, task, "raw", 1))}
    series.update({w: ("avg", series_records(history, task, "avg", w)) for w in windows})
    shared = set.intersection(*({r["step"] for r in records} for _, records in series.values()))
    steps = sorted(shared)
    if len(steps) < 2:
        return []
    final = steps[-final_count(len(steps), final_fraction) :]
    per_example = {n: _correct_at(history, task, variant, n, final) for n, (variant, _) in series.items()}
    raw = per_example[1]
    rows = []
    for n, (_, records) in series.items():
        by_step = {r["step"]: r["score"] for r in records}
        scores = [by_step[step] for step in final]
        difference = None
        values = per_example[n]
        if values is not None and raw is not None and len(values[0]) == len(raw[0]):
            difference = paired_difference(
                _example_means(values, examples),
                _example_means(raw, examples),
                resamples=RESAMPLES,
                seed=SEED,
            ).to_json()
        rows.append(
            {
                "n": n,
                "mtv": mean_total_variation(scores),
                "score": math.fsum(scores) / len(scores),
                "confirmation_diff": difference,
            }
        )
    return rows


def _correct_at(history: RunView, task: str, variant: str, window: int, steps: list[int]) -> list | None:
    """The stored per-example ``correct`` of a series at each of ``steps``; None when a step has no line
    or the lines differ in length (the task's examples changed)."""
    by_step = {line["step"]: line["correct"] for line in _series_lines(history, task, variant, window)}
    if not all(step in by_step for step in steps):
        return None
    values = [by_step[step] for step in steps]
    return values if len({len(v) for v in values}) == 1 else None


def _example_means(per_step: list[list[float]], examples: Sequence[int] | None) -> list[float]:
    """Per example (those ``examples`` lists, or all), the mean of its score over the steps of
    ``per_step`` (one list of per-example scores per step)."""
    indices = range(len(per_step[0])) if examples is None else examples
    return [math.fsum(float(values[i]) for values in per_step) / len(per_step) for i in indices]


def drift_jumps(lines: Sequence[dict]) -> dict:
    """Which snapshots moved by a jump, and which windows span one, from drift lines ordered by step.

    The rule: a snapshot's ``previous`` drift is a **jump** when it exceeds :data:`JUMP_FACTOR` × the
    median ``previous`` of the run (over the snapshots that have one; at least
    :data:`MIN_DRIFT_VALUES` are needed, else no jump is called). The window of a snapshot is the
    ``n_models`` snapshots ending there; it **spans** a jump when one of its snapshots other than the
    oldest is a jump, i.e. the jump lies between two snapshots the window combines (the oldest one's
    jump came from a snapshot outside the window).

    Returns ``{"median", "threshold", "values", "jumps", "spanning"}``: the median and the threshold
    (None with too few values), how many ``previous`` values there are, the jump steps and the steps
    whose window spans a jump, both ascending.

    >>> lines = [{"step": 10 * k, "previous": p, "n_models": min(k, 2)}
    ...          for k, p in enumerate([None, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1], start=1)]
    >>> found = drift_jumps(lines)
    >>> found["median"], found["jumps"], found["spanning"]
    (0.1, [50], [50])
    """
    values = [line["previous"] for line in lines if line["previous"] is not None]
    if len(values) < MIN_DRIFT_VALUES:
        return {"median": None, "threshold": None, "values": len(values), "jumps": [], "spanning": []}
    median = statistics.median(values)
    threshold = JUMP_FACTOR * median
    jumped = [line["previous"] is not None and line["previous"] > threshold for line in lines]
    spanning = []
    for i, line in enumerate(lines):
        oldest = max(0, i - line["n_models"] + 1)
        if any(jumped[oldest + 1 : i + 1]):
            spanning.append(line["step"])
    return {
        "median": median,
        "threshold": threshold,
        "values": len(values),
        "jumps": [line["step"] for line, jump in zip(lines, jumped, strict=True) if jump],
        "spanning": spanning,
    }


def step_runs(chosen: Sequence[int], order: Sequence[int]) -> list[tuple[int, int]]:
    """``chosen`` steps (ascending, each in ``order``) as (first, last) runs of consecutive ``order`` steps.

    >>> step_runs([20, 30, 40, 70], [10, 20, 30, 40, 50, 60, 70])
    [(20, 40), (70, 70)]
    """
    position = {step: i for i, step in enumerate(order)}
    runs: list[list[int]] = []
    for step in chosen:
        if runs and position[step] == position[runs[-1][1]] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return [(first, last) for first, last in runs]


def drift_by_step(lines: Sequence[dict]) -> list[dict]:
    """Drift lines ordered by step; a step written twice (a resumed run) keeps its last line."""
    by_step = {line["step"]: line for line in lines}
    return [by_step[step] for step in sorted(by_step)]


# ---------------------------------------------------------------------------------------------- the report


class _ReportWriter:
    """Renders report.md and the PNGs for one History into an (empty) directory."""

    def __init__(self, history: RunView, run_dir: Path, out: Path):
        self.history = history
        self.run_dir = run_dir
        self.out = out
        self.records = history.records()
        self.tasks = list(dict.fromkeys(r["task"] for r in self.records if r["task"] != MEAN_TASK))
        self.final_label = f"final {round(100 * FINAL_FRACTION)}%"
        self._file_names: set[str] = set()
        self.summary: dict[tuple, dict] = {}
        self.md: list[str] = []
        self.best, self.best_problem = _read_best(run_dir)
        self.evidence, self.evidence_problem = _parse_evidence(self.best)
        self.drift_lines = drift_by_step(history.drift())

    def write(self) -> None:
        self.md += ["# Checkpoint stability report", ""]
        self.md += [
            f"Run directory: `{self.run_dir.resolve()}`  ",
            f"Written {time.strftime('%Y-%m-%d %H:%M')}",
            "",
        ]
        if not self.tasks:
            self.md += [
                "**No evaluation records yet.** `history.jsonl` holds no score line: no snapshot has been "
                "evaluated (or every evaluation failed). Rerun the report once the run has evaluated at "
                "least one snapshot.",
                "",
            ]
            self._best_model()
        else:
            self._overview()
            self._best_model()
            self._evidence()
            self._table()
            self._curves()
            self._flips()
            self._bias()
            self._sweep()
            self._recommendation()
        self._drift()
        self._errors()
        _write_new_file(self.out, REPORT_FILE, ("\n".join(self.md).rstrip() + "\n").encode("utf-8"))

    # ------------------------------------------------------------------ sections

    def _overview(self) -> None:
        steps = sorted({r["step"] for r in self.records})
        self.md += [
            f"Evaluated at {len(steps)} step(s), {steps[0]} to {steps[-1]}.",
            "",
            "| task | kind | metric | examples | series (variant, window) |",
            "|---|---|---|---:|---|",
        ]
        for task in self.tasks:
            meta = self.history.meta(task) or {}
            series = ", ".join(f"{v} {w}" for v, w in series_keys(self.history, task))
            examples = len(meta["example_ids"]) if meta else "?"
            self.md.append(
                f"| {_cell(task)} | {_cell(meta.get('kind', '?'))} | {_cell(meta.get('metric', '?'))} "
                f"| {examples} | {series} |"
            )
        self.md.append("")

    def _best_model(self) -> None:
        self.md += ["## Best model", ""]
        best = self.best
        if self.best_problem is not None:
            self.md += [
                f"`{BEST_FILE}` cannot be used, so no best model is shown: {_cell(self.best_problem)}",
                "",
            ]
            return
        if best is None:
            if (self.run_dir / ANALYSIS_FILE).is_file():
                why = "an offline analysis (`analyze`) evaluates checkpoints and selects none"
            else:
                why = (
                    f"the run directory holds no `{BEST_FILE}`: selection was off (`select=None`), or no "
                    "snapshot was scored yet"
                )
            self.md += [f"No best model was selected: {why}.", ""]
            return
        step, variant = best["step"], best["variant"]
        steps = list(best.get("steps") or [step])
        self.md += [
            f"The model the run selected, as `{BEST_FILE}` records it: **step {step}, {variant}**.",
            "",
            f"- **Step**: {step}",
            f"- **Variant**: {variant} ({_VARIANT_MEANING.get(variant, variant)})",
            f"- **Window**: {_window_text(variant, steps)}",
        ]
        metric, mode = best.get("metric"), best.get("mode") or "max"
        if best.get("score") is None:
            self.md.append(
                "- **Score**: none — a run without tasks exports its final window average; nothing was scored"
            )
        else:
            better = "higher" if mode == "max" else "lower"
            candidates = _SELECT_CANDIDATES.get(best.get("select") or "", "")
            select = f"; `select={best['select']!r}`{candidates}" if best.get("select") else ""
            self.md += [
                f"- **Selected on**: the `{_cell(metric)}` score, {better} is better (mode `{mode}`{select})",
                f"- **Score**: {best['score']:.4f}",
            ]
        self.md += self._best_scores(best)
        self.md += self._best_export(best)
        kept = [entry for entry in best.get("kept") or [] if isinstance(entry, dict)]
        if kept:
            self.md.append(
                f"Earlier bests, chosen under other settings, are kept beside it (`kept` in `{BEST_FILE}`):"
            )
            self.md.append("")
            for entry in kept:
                where = f"`{entry['path']}`" if entry.get("path") else "not exported (an ensemble)"
                scored = ""
                if entry.get("score") is not None:
                    scored = f", {_cell(entry.get('metric') or 'score')} score {_score_text(entry['score'])}"
                what = f"step {_cell(entry.get('step'))}, {_cell(entry.get('variant'))}{scored}"
                self.md.append(f"- {what}: {_cell(where)}")
            self.md.append("")

    def _best_scores(self, best: dict) -> list[str]:
        scores = best.get("scores")
        if not isinstance(scores, dict) or not scores:
            return [""]
        lines = ["", f"Scores of {best['variant']} at step {best['step']}:", ""]
        lines += ["| task | score |", "|---|---:|"]
        for task, score in scores.items():
            lines.append(f"| {_cell(task)} | {_score_text(score)} |")
        if best.get("metric") == MEAN_TASK and best.get("score") is not None:
            lines.append(f"| mean over tasks | {best['score']:.4f} |")
        if len(scores) == 1 and best.get("metric") == MEAN_TASK:
            lines += ["", "With one task, the mean over tasks is that task's score."]
        return [*lines, ""]

    def _best_export(self, best: dict) -> list[str]:
        if best.get("path") is None:
            return [
                "- **Export**: none — an ensemble is the vote of several snapshots' outputs, not one set of "
                "weights; `load_best` refuses it (`select='avg'` or `'raw'` exports weights)",
                "",
            ]
        run_dir = str(self.run_dir.resolve())
        export = self.run_dir.resolve() / best["path"]
        lines = [
            f"- **Export**: `{best['path']}` (in the run directory)",
            "",
            "Load it into a model of the architecture that was trained:",
            "",
            "```python",
            "import checkpoint_stability",
            "",
            f"checkpoint_stability.load_best({_python_string(run_dir)}, model)",
            "```",
            "",
        ]
        if (export / "config.json").is_file():
            lines += [
                "It is a Hugging Face `save_pretrained` directory (it holds `config.json`), so it also loads "
                "on its own:",
                "",
                "```python",
                "from transformers import AutoModelForCausalLM",
                "",
                f"model = AutoModelForCausalLM.from_pretrained({_python_string(str(export))})",
                "```",
                "",
            ]
        else:
            lines += [
                "It holds the weights only (no `config.json`, so not a Hugging Face `save_pretrained` "
                "directory): `load_best` puts them into a model you build.",
                "",
            ]
        return lines

    def _evidence(self) -> None:
        """Whether the chosen model holds up on examples selection never read (``best.json``'s
        ``evidence``): the chosen, naive, final raw and best candidate side by side, the regret, and the
        bootstrap intervals at the chosen step. Absent evidence (an older run): no section."""
        if self.evidence_problem is not None:
            self.md += [
                "## Does the choice hold up?",
                "",
                f"`{BEST_FILE}` holds selection evidence that cannot be used: "
                f"{_cell(self.evidence_problem)}.",
                "",
            ]
            return
        evidence = self.evidence
        if evidence is None:
            return
        self.md += ["## Does the choice hold up?", "", self._evidence_intro(evidence), ""]
        self.md += self._evidence_table(evidence)
        self.md += self._evidence_intervals(evidence)
        unavailable = evidence.get("unavailable") or []
        if unavailable:
            names = ", ".join(f"`{_cell(task)}`" for task in unavailable)
            self.md += [f"Confirmation scores could not be computed for task(s) {names}.", ""]

    def _evidence_intro(self, evidence: dict) -> str:
        holdout, metric = evidence.get("holdout"), evidence.get("metric") or "score"
        as_of = evidence.get("as_of")
        covers = f" The evidence covers the snapshots up to step {as_of}." if as_of is not None else ""
        if holdout is None:
            return (
                f"**No holdout**: the run selected on the `{_cell(metric)}` score over all examples, and the "
                "scores below are on those same examples. The chosen model is the best of many noisy scores, "
                "so its scores here are biased upward: they cannot confirm the choice. To hold out examples "
                "that selection never reads, set `holdout=0.5` (e.g. `StabilityCallback(..., holdout=0.5)`)."
                + covers
            )
        return (
            f"Selection read only the selection half of each task's examples (the `{_cell(metric)}` score); "
            f"the **confirmation half** (`holdout={holdout:g}`: an example's half is fixed by a hash of its "
            "task and id) was held out, so its scores say whether the choice holds up on examples selection "
            "never saw. The naive choice is the raw checkpoint a user picking the best raw selection score "
            "would have taken." + covers
        )

    def _evidence_table(self, evidence: dict) -> list[str]:
        if evidence.get("holdout") is None:
            headers = "selection score (all examples) | confirmation score (the same examples)"
        else:
            headers = "selection score | confirmation score"
        lines = [f"| model | step | variant | {headers} |", "|---|---:|---|---:|---:|"]
        for key, label in _EVIDENCE_ROWS:
            entry = evidence.get(key)
            if entry is None:
                lines.append(f"| {label} | n/a | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {label} | {entry['step']} | {_cell(entry['variant'])} "
                f"| {_optional_score(entry.get('selection_score'))} "
                f"| {_optional_score(entry.get('confirmation_score'))} |"
            )
        regret = evidence.get("regret")
        if regret is None:
            regret_text = "n/a (no confirmation score for the chosen model or the candidates)"
        else:
            regret_text = (
                f"{regret:.4f} — the best candidate's confirmation score minus the chosen one's (0: no "
                "candidate scored higher there)"
            )
        chosen = evidence["chosen"]
        best = self.best or {}
        lines += ["", f"- **Regret**: {regret_text}"]
        if (chosen["step"], chosen["variant"]) != (best.get("step"), best.get("variant")):
            lines.append(
                f"- The evidence describes step {chosen['step']}, {_cell(chosen['variant'])}, while "
                f"`{BEST_FILE}` points at step {best.get('step')}, {_cell(best.get('variant'))} (written at "
                "different moments of a live run)."
            )
        return [*lines, ""]

    def _evidence_intervals(self, evidence: dict) -> list[str]:
        intervals = evidence.get("intervals") or {}
        if not any(intervals.get(key) for key in ("score", "avg_minus_raw", "ens_minus_raw")):
            return []
        examples = evidence.get("examples")
        where = "the confirmation examples" if examples == "confirmation" else "all examples"
        step = evidence["chosen"]["step"]
        lines = [
            f"Bootstrap intervals over {where} at the chosen step {step} (paired for the differences):",
            "",
        ]
        score = _json_interval(intervals.get("score"))
        if score is not None:
            lines.append(f"- **Chosen score**: {_interval_text(score, signed=False)}")
        for key, name in (("avg_minus_raw", "avg − raw"), ("ens_minus_raw", "ens − raw")):
            interval = _json_interval(intervals.get(key))
            if interval is not None:
                lines.append(f"- **{name}**: {_interval_text(interval, signed=True)}: {_verdict(interval)}")
        return [*lines, ""]

    def _table(self) -> None:
        include_mean = len(self.tasks) > 1
        final_rows = summarize(self.history, final_fraction=FINAL_FRACTION, include_mean=include_mean)
        whole = {
            _key(row): row for row in summarize(self.history, final_fraction=1.0, include_mean=include_mean)
        }
        self.summary = {_key(row): row for row in final_rows}
        percent = round(100 * FINAL_FRACTION)
        self.md += [f"## Stability: final {percent}% of evaluations and whole run", ""]
        if not final_rows:
            self.md += ["No series has two evaluations yet: MTV and IS need two.", ""]
            return
        # A run with holdout gets the confirmation-half score beside each score; others keep the old layout.
        confirmation = any(row["confirmation_last"] is not None for row in final_rows)
        held_out = f" | confirmation score, final {percent}%" if confirmation else ""
        held_out_run = " | confirmation score, whole run" if confirmation else ""
        self.md += [
            f"| task | variant | window | evaluations, final {percent}% / all | score, final {percent}%"
            f"{held_out} | MTV, final {percent}% | IS, final {percent}% | MTV ÷ raw | IS ÷ raw "
            f"| score, whole run{held_out_run} | MTV, whole run | IS, whole run |",
            "|---|---|---:|---:|---:|"
            + ("---:|" if confirmation else "")
            + "---:|---:|---:|---:|---:|"
            + ("---:|" if confirmation else "")
            + "---:|---:|",
        ]
        raw = {row["task"]: row for row in final_rows if row["variant"] == "raw"}
        for row in final_rows:
            run = whole[_key(row)]
            base = raw.get(row["task"], {})
            row_held_out = f" | {format_number(row['confirmation_last'])}" if confirmation else ""
            run_held_out = f" | {format_number(run['confirmation_last'])}" if confirmation else ""
            self.md.append(
                f"| {_cell(row['task'])} | {row['variant']} | {row['window']} "
                f"| {row['evaluations']} / {row['total']} | {row['score_last']:.4f}{row_held_out} "
                f"| {row['mtv']:.4f} | {format_number(row['is'])} "
                f"| {format_ratio(row['mtv'], base.get('mtv'))} | {format_ratio(row['is'], base.get('is'))} "
                f"| {run['score_last']:.4f}{run_held_out} | {run['mtv']:.4f} | {format_number(run['is'])} |"
            )
        self.md += [""]
        if confirmation:
            self.md.append(
                "- **confirmation score**: the mean score on the confirmation half of the examples "
                "(`holdout`), which selection never reads; n/a where not every record of the series "
                "carries one."
            )
        self.md += [
            "- **MTV** (mean total variation): the mean absolute change of the score between consecutive "
            "evaluations. **IS** (instability score): the share of examples whose output changes between "
            "consecutive evaluations (exact match), averaged over examples. Lower is steadier; "
            "a ratio ÷ raw below 1 is steadier than the live model.",
            f"- The final {percent}% is the last ceil({FINAL_FRACTION} × evaluations) of each series, "
            "at least two. **window**: how many snapshots avg / ens combine (raw: 1).",
        ]
        if include_mean:
            self.md.append(
                "- **mean**: the score averaged over tasks at each step; its MTV is that of the mean-score "
                "series, its IS the mean of the tasks' IS."
            )
        else:
            self.md.append(
                f"- With one task, the mean over tasks is that task's score: the `{MEAN_TASK}` series (which "
                "best-model selection uses by default) has no rows or plot of its own."
            )
        self.md += self._series_notes()
        self.md.append("")

    def _series_notes(self) -> list[str]:
        notes = []
        raw_steps = {r["step"] for r in self.records if r["variant"] == "raw"}
        keys = dict.fromkeys(key for task in self.tasks for key in series_keys(self.history, task))
        for variant, window in keys:
            if variant == "raw":
                continue
            steps = {r["step"] for r in self.history.records(variant=variant, window=window)}
            sparse = steps and raw_steps and len(steps) < len(raw_steps)
            if variant == "avg" and sparse:
                notes.append(
                    f"- avg (window {window}) was evaluated at {len(steps)} of the {len(raw_steps)} "
                    "snapshot steps (`average_every` > 1): its MTV and IS are computed over its own, "
                    "sparser evaluations, so each change spans more training than raw's or ens's."
                )
        filling = [
            r
            for r in self.records
            if r["variant"] != "raw" and r["n_models"] < r["window"] and r["task"] != MEAN_TASK
        ]
        if filling:
            last = max(r["step"] for r in filling)
            notes.append(
                f"- Up to step {last}, some avg / ens evaluations combine fewer snapshots than their window "
                "(the window was still filling up)."
            )
        return notes

    def _curves(self) -> None:
        from checkpoint_stability.reporting.plots import Curve, best_marker, plot_scores

        self.md += ["## Scores over training", ""]
        self.md += [
            "Grey: the live model (raw). Blue: the window's weight average (avg). Orange: the vote of the "
            f"window's outputs (ens). Shaded: the {self.final_label} of evaluations that the table covers."
            + (
                f" Dashed line and star: the best model (step {self.best['step']}, {self.best['variant']})."
                if self.best is not None
                else ""
            ),
            "",
        ]
        names = self.tasks + ([MEAN_TASK] if len(self.tasks) > 1 else [])
        for task in names:
            curves = []
            for variant, window in series_keys(self.history, task):
                records = series_records(self.history, task, variant, window)
                row = self.summary.get((task, variant, window))
                curves.append(
                    Curve(
                        variant=variant,
                        window=window,
                        steps=[r["step"] for r in records],
                        scores=[r["score"] for r in records],
                        mtv=row["mtv"] if row else None,
                    )
                )
            if not curves:
                continue  # the mean over tasks, when no record of it was kept
            raw = next((c for c in curves if c.variant == "raw"), None)
            others = [c for c in curves if c is not raw]
            reference = raw or max(curves, key=lambda c: len(c.steps))
            final_start = None
            if len(reference.steps) >= 2:
                final_start = reference.steps[-final_count(len(reference.steps), FINAL_FRACTION)]
            metric = self._metric(task)
            name = self._file_name("scores", task)
            plot_scores(
                self.out / name,
                task=task,
                metric=metric,
                raw=raw,
                others=others,
                final_start=final_start,
                final_label=self.final_label,
                best=best_marker(self.best, curves),
            )
            title = "Mean over tasks" if task == MEAN_TASK else f"Task {task}"
            self.md += [f"![{title}: score over steps]({name})", ""]

    def _metric(self, task: str) -> str:
        if task == MEAN_TASK:
            metrics = {(self.history.meta(t) or {}).get("metric") for t in self.tasks}
            return str(metrics.pop()) if len(metrics) == 1 and None not in metrics else "mean over tasks"
        return str((self.history.meta(task) or {}).get("metric", "score"))

    def _flips(self) -> None:
        from checkpoint_stability.reporting.plots import FlipPanel, plot_flips

        self.md += ["## Which examples flip", ""]
        self.md += [
            f"Per-example scores over the last {FLIP_EVALUATIONS} evaluations (or fewer): each row an "
            "example, each column an evaluation; blue is correct. Examples whose score never changes in "
            "any panel are left out; those that change most often in raw come first.",
            "",
        ]
        for task in self.tasks:
            meta = self.history.meta(task)
            panels_data = self._flip_series(task)
            if not panels_data or panels_data[0][0] != "raw":
                self.md += [f"Task {task}: fewer than two raw evaluations with stored outputs.", ""]
                continue
            n_examples = len(panels_data[0][2][-1]["correct"])
            panels_data = [p for p in panels_data if len(p[2][-1]["correct"]) == n_examples]
            changes = [_changes(lines, n_examples) for _, _, lines in panels_data]
            flipping = [i for i in range(n_examples) if any(c[i] for c in changes)]
            counts = [sum(1 for i in range(n_examples) if c[i]) for c in changes]
            summary = ", ".join(
                f"{_variant_label(v, w)}: {count}"
                for (v, w, _), count in zip(panels_data, counts, strict=True)
            )
            self.md.append(
                f"Task {_cell(task)}: examples (of {n_examples}) whose score changes at least once over the "
                f"last evaluations — {summary}."
            )
            if not flipping:
                self.md += ["", "No example changes its score over these evaluations: nothing to show.", ""]
                continue
            raw_changes = changes[0]
            raw_lines = panels_data[0][2]
            order = sorted(
                flipping,
                key=lambda i: (
                    -raw_changes[i],
                    -sum(c[i] for c in changes),
                    -math.fsum(line["correct"][i] for line in raw_lines),
                    i,
                ),
            )
            shown = order[:MAX_FLIP_ROWS]
            ids = (
                meta["example_ids"] if meta and len(meta["example_ids"]) == n_examples else range(n_examples)
            )
            ids = list(ids)
            labels = [_short(ids[i]) for i in shown]
            panels = []
            for (variant, window, lines), count in zip(panels_data, counts, strict=True):
                values = [[float(line["correct"][i]) for line in lines] for i in shown]
                title = f"{_variant_label(variant, window)}\n{count} of {n_examples} change"
                panels.append(FlipPanel(title=title, steps=[line["step"] for line in lines], values=values))
            if len(shown) < len(flipping):
                subtitle = (
                    f"{len(shown)} of the {len(flipping)} examples whose score changes, most changes first"
                )
            else:
                subtitle = f"all {len(flipping)} example(s) whose score changes at least once"
            name = self._file_name("flips", task)
            plot_flips(self.out / name, task=task, panels=panels, row_labels=labels, subtitle=subtitle)
            self.md += ["", f"![Task {task}: per-example scores over the last evaluations]({name})", ""]
            self.md += [_example_id_caption(task, meta), ""]

    def _flip_series(self, task: str) -> list[tuple[str, int, list[dict]]]:
        """(variant, window, last examples lines) for raw and the largest avg and ens windows (the
        steadiest), each with at least two lines of the newest line's length."""
        keys = series_keys(self.history, task)
        series = [(v, w) for v, w in keys if v == "raw"][:1]
        for variant in VARIANTS[1:]:
            windows = [w for v, w in keys if v == variant]
            if windows:
                series.append((variant, max(windows)))
        found = []
        for variant, window in series:
            lines = _series_lines(self.history, task, variant, window)[-FLIP_EVALUATIONS:]
            size = len(lines[-1]["correct"]) if lines else 0
            lines = [line for line in lines if len(line["correct"]) == size]
            if len(lines) >= 2:
                found.append((variant, window, lines))
        return found

    def _sweep(self) -> None:
        from checkpoint_stability.reporting.plots import plot_window_sweep

        percent = round(100 * FINAL_FRACTION)
        self.md += ["## Ensemble window size", ""]
        self.md += [
            f"The vote of the last n raw evaluations at each step, recomputed from the stored per-example "
            f"outputs and the targets in `{EXAMPLES_DIR}/<task>.meta.json` (no model is run); score, MTV "
            f"and IS over the final {percent}% of evaluations. n = 1 is the live model (raw). Ties go to "
            "the highest summed log-probability where the task stored them, else to the newest snapshot.",
            "",
        ]
        sweeps: dict[str, list[dict]] = {}
        notes = []
        for task in self.tasks:
            meta = self.history.meta(task)
            if meta is None:
                notes.append(f"- Task {_cell(task)}: no usable meta file (targets unknown); left out.")
                continue
            try:
                rows = window_sweep(self.history, task)
            except ValueError as error:
                # Stored lines that are each fine but do not fit together (log-probabilities with another
                # number of choices at another step): this task's sweep cannot be recomputed.
                path = self.run_dir / EXAMPLES_DIR / f"{task}.jsonl"
                logger.warning("%s: no window sweep for task %r: %s", path, task, error)
                notes.append(f"- Task {_cell(task)}: the stored outputs cannot be voted on ({_cell(error)}).")
                continue
            if not rows:
                notes.append(f"- Task {_cell(task)}: fewer than two raw evaluations with stored outputs.")
                continue
            sweeps[task] = rows
            if any(row["n"] == 2 for row in rows) and not self._has_logprobs(task):
                notes.append(
                    f"- Task {_cell(task)}: without stored log-probabilities, two snapshots that disagree "
                    "tie and the newest wins, so n = 2 equals raw."
                )
            mismatch = _rescoring_mismatch(self.history, task)
            if mismatch:
                notes.append(
                    f"- Task {_cell(task)}: re-scoring the stored raw outputs against meta.json's targets "
                    f"with metric {meta['metric']!r} differs from the stored scores for "
                    f"{100 * mismatch:.1f}% of them (a task whose metric normalises answers, e.g. an "
                    "lm-eval generation task): its scores and MTV here are approximate, its IS is not."
                )
        if not sweeps:
            self.md += [*notes, ""]
            return
        self.md += [
            f"| task | n | score, final {percent}% | MTV, final {percent}% | IS, final {percent}% "
            "| evaluations |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for task, rows in sweeps.items():
            for row in rows:
                self.md.append(
                    f"| {_cell(task)} | {row['n']} | {row['score']:.4f} | {row['mtv']:.4f} | {row['is']:.4f} "
                    f"| {row['evaluations']} / {row['total']} |"
                )
        self.md += [""] + notes + ([""] if notes else [])
        name = self._file_name("window", "sweep")
        plot_window_sweep(self.out / name, sweeps=sweeps, final_label=self.final_label)
        self.md += [f"![Ensemble window-size sweep]({name})", ""]

    def _has_logprobs(self, task: str) -> bool:
        return all("choice_logprobs" in line for line in self.history.outputs(task, "raw", 1))

    def _recommendation(self) -> None:
        """The window size to use, per task and per integration, by ``recommend_window``'s rule.

        Shown for runs that record selection evidence, holdout scores or drift (this release's runs) and
        for runs holding avg series at several windows (``analyze``); a report of an older live run stays
        as it was."""
        new_format = self.evidence is not None or bool(self.drift_lines) or self._has_holdout_scores()
        found = []
        for task in self.tasks:
            examples, note = self._paired_examples(task)
            try:
                ens = ensemble_window_rows(self.history, task, examples=examples)
            except ValueError:  # no usable meta, or outputs that cannot be voted on: the sweep says why
                ens = []
            avg = average_window_rows(self.history, task, examples=examples)
            if (ens and new_format) or avg:
                found.append((task, note, ens if new_format else [], avg))
        if not found:
            return
        percent = round(100 * FINAL_FRACTION)
        self.md += [
            "## Recommended window",
            "",
            "Which window size to use, per task (tasks can disagree) and per integration: the vote of the "
            "last n raw evaluations (the sweep above, recomputed from the stored outputs), and the weight "
            "average at each window the history holds (`analyze` with several `windows`; a live run "
            "evaluates one window, so it gets no average recommendation). The rule (`recommend_window`, "
            f"tolerance {WINDOW_TOLERANCE:g}): the smallest window whose MTV is at most "
            f"(1 + {WINDOW_TOLERANCE:g}) × the lowest MTV measured and whose difference from raw is not "
            "significantly below 0. A smaller window costs less and follows the model sooner.",
            "",
            f"MTV and score: over the final {percent}% of evaluations, all examples; n = 1 is raw itself. "
            "variant − raw: per example, the mean of its score over the same evaluations, variant minus raw, "
            f"{self._paired_examples_text()}; paired bootstrap, 95%, {RESAMPLES:,} resamples, seed {SEED}.",
            "",
        ]
        for task, note, ens, avg in found:
            for variant, title, rows in (
                ("ens", "ensemble (vote of the last n raw outputs)", ens),
                ("avg", "average (the weights of the last n snapshots)", avg),
            ):
                if rows:
                    self.md += [f"### Task {_cell(task)}: {title}", ""]
                    self.md += [note, ""] if note else []
                    self.md += self._recommendation_table(variant, rows)

    def _recommendation_table(self, variant: str, rows: list[dict]) -> list[str]:
        result = recommend_window(rows, tolerance=WINDOW_TOLERANCE)
        excluded = {entry["n"]: entry["reason"] for entry in result["excluded"]}
        percent = round(100 * FINAL_FRACTION)
        lines = [
            f"| n | MTV, final {percent}% | score, final {percent}% | {variant} − raw | |",
            "|---:|---:|---:|---|---|",
        ]
        for row in sorted(rows, key=lambda row: row["n"]):
            n = row["n"]
            if n == result["n"]:
                verdict = "**recommended**"
            elif n in excluded:
                verdict = f"excluded: {_cell(excluded[n])}"
            else:
                verdict = "eligible"
            difference = _difference_text(row["confirmation_diff"])
            lines.append(f"| {n} | {row['mtv']:.4f} | {row['score']:.4f} | {difference} | {verdict} |")
        if result["n"] is None:
            lines += [
                "",
                f"**No window recommended**: {_cell(result['reason'])}. Rule: {_cell(result['rule'])}.",
            ]
        else:
            lines += ["", f"**Recommended: n = {result['n']}.** Rule: {_cell(result['rule'])}."]
        return [*lines, ""]

    def _has_holdout_scores(self) -> bool:
        return any(holdout_score(r, "confirmation_score") is not None for r in self.records)

    def _paired_examples_text(self) -> str:
        """Which examples the report's own paired differences run over, for the whole run."""
        if self.evidence is not None and self.evidence.get("holdout") is not None:
            return f"over the confirmation half (`holdout={self.evidence['holdout']:g}`)"
        if self.evidence is None and self._has_holdout_scores():
            return (
                "over all examples: the records carry confirmation scores, but `best.json` records no "
                "holdout size (no selection evidence), so the confirmation half is unknown here"
            )
        return "over all examples (the run had no holdout)"

    def _paired_examples(self, task: str) -> tuple[list[int] | None, str]:
        """The indices of ``task``'s examples the paired differences use (None: all), and a note when
        the confirmation half the run held out cannot be used for this task."""
        holdout = self.evidence.get("holdout") if self.evidence is not None else None
        meta = self.history.meta(task)
        if holdout is None or meta is None:
            return None, ""
        try:
            return split(task, meta["example_ids"], holdout).confirmation, ""
        except ValueError as error:
            return None, f"Over all examples for this task: {_cell(error)}."

    def _drift(self) -> None:
        """How far the weights moved between snapshots and from the window average (``drift.jsonl``),
        and which windows span a jump. A run without drift lines (an older one) gets no section."""
        from checkpoint_stability.reporting.plots import plot_drift

        lines = self.drift_lines
        if not lines:
            return
        found = drift_jumps(lines)
        spans = step_runs(found["spanning"], [line["step"] for line in lines])
        name = self._file_name("weight", "drift")
        plot_drift(
            self.out / name,
            steps=[line["step"] for line in lines],
            previous=[line["previous"] for line in lines],
            average=[line["average"] for line in lines],
            jumps=found["jumps"],
            spans=spans,
            threshold=found["threshold"],
            threshold_label=f"jump threshold: {JUMP_FACTOR:g} × the median previous",
        )
        self.md += [
            "## Weight drift",
            "",
            f"How far the weights move at each snapshot (`{DRIFT_FILE}`): **previous** = ‖θ_t − θ_prev‖ / "
            "‖θ_t‖, the move since the previous snapshot; **average** = ‖θ_t − θ̄‖ / ‖θ_t‖, how far the "
            "snapshot is from the average of its window (the `n_models` snapshots ending there).",
            "",
            f"![Weight drift over training]({name})",
            "",
            f"The rule: a snapshot's move is a **jump** when its `previous` drift exceeds {JUMP_FACTOR:g} × "
            f"the run's median `previous` (at least {MIN_DRIFT_VALUES} values needed); a step's window "
            f"**spans** a jump when one of its snapshots other than the oldest is a jump (the oldest one's "
            "move came from outside the window).",
            "",
        ]
        self.md += self._jump_notes(lines, found, spans)

    def _jump_notes(self, lines: list[dict], found: dict, spans: list[tuple[int, int]]) -> list[str]:
        if found["median"] is None:
            return [
                f"Only {found['values']} snapshot(s) have a `previous` drift: too few for a median to say "
                "what a jump is.",
                "",
            ]
        median = found["median"]
        notes = [
            f"Median `previous` drift: {median:.4g} over {found['values']} snapshots, so a jump is above "
            f"{found['threshold']:.4g}.",
            "",
        ]
        if not found["jumps"]:
            return [*notes, "- No jump: no snapshot moved more than that.", ""]
        previous = {line["step"]: line["previous"] for line in lines}
        shown = [
            f"step {step} ({previous[step]:.4g}"
            + (f", {previous[step] / median:.1f}× the median)" if median > 0 else ")")
            for step in found["jumps"][:MAX_STEPS_LISTED]
        ]
        more = len(found["jumps"]) - len(shown)
        notes.append(
            f"- **Jumps** ({len(found['jumps'])}): {', '.join(shown)}"
            + (f", and {more} more" if more else "")
            + "."
        )
        if spans:
            ranges = [f"{first}–{last}" if first != last else str(first) for first, last in spans]
            listed = ", ".join(ranges[:MAX_STEPS_LISTED]) + (
                f", and {len(ranges) - MAX_STEPS_LISTED} more" if len(ranges) > MAX_STEPS_LISTED else ""
            )
            notes.append(f"- **Windows that span a jump** (by the step they end at): {listed}.")
        else:
            notes.append(
                "- No window spans a jump (each jump is its window's oldest snapshot, or windows of one)."
            )
        notes += [
            "",
            "Jumps early in training are expected (warm-up: the learning rate and the weights' scale change "
            "fast). An average over a window that spans a jump mixes models far apart, so its score says "
            "little about either side; such a window is a poor choice of best model.",
            "",
        ]
        return notes

    def _bias(self) -> None:
        """Choice tasks: each variant's majority share and balanced accuracy over the final evaluations,
        flagging a variant that collapsed onto one answer while raw did not."""
        rows = []
        for task in self.tasks:
            series = {}
            for variant, window in series_keys(self.history, task):
                records = [r for r in series_records(self.history, task, variant, window) if _has_bias(r)]
                if records:
                    series[(variant, window)] = records[-final_count(len(records), FINAL_FRACTION) :]
            raw = series.get(("raw", 1))
            if not series or raw is None:
                continue
            raw_share = math.fsum(r["majority_share"] for r in raw) / len(raw)
            for (variant, window), last in series.items():
                share = math.fsum(r["majority_share"] for r in last) / len(last)
                balanced = math.fsum(r["balanced_accuracy"] for r in last) / len(last)
                flag = variant != "raw" and collapsed(share, raw_share)
                rows.append((task, _variant_label(variant, window), share, balanced, flag))
        if not rows:
            return
        self.md += [
            "## Answer bias",
            "",
            f"Choice tasks, mean over the {self.final_label} of evaluations: the share of the most-predicted "
            "answer, and balanced accuracy (the mean per-class recall). A variant is flagged when its "
            "answers collapse onto one (share at least 0.9) while raw's do not (at most 0.7): a vote across "
            "checkpoints biased in opposite directions can score well below each of them this way.",
            "",
            "| task | variant | majority share | balanced accuracy | |",
            "|---|---|---:|---:|---|",
        ]
        for task, label, share, balanced, flag in rows:
            mark = "**collapsed onto one answer**" if flag else ""
            self.md.append(f"| {_cell(task)} | {label} | {share:.3f} | {balanced:.3f} | {mark} |")
        self.md.append("")

    def _errors(self) -> None:
        errors = self.history.errors()
        if not errors:
            return
        self.md += ["## Errors", "", f"{len(errors)} error line(s) in `{HISTORY_FILE}`; the first ones:", ""]
        self.md += ["| step | phase | task | variant | error |", "|---:|---|---|---|---|"]
        for error in errors[:MAX_ERRORS_LISTED]:
            message = error["error"].strip().splitlines()[0] if error["error"].strip() else ""
            self.md.append(
                f"| {error['step']} | {_cell(error['phase'])} | {_cell(error['task'] or '')} "
                f"| {_cell(error['variant'] or '')} | {_cell(_short(message, 160))} |"
            )
        self.md.append("")

    def _file_name(self, kind: str, task: str) -> str:
        """``<kind>-<task>.png`` with the task name made file-name safe and unique within the report: only
        ASCII letters, digits, ``.``, ``_`` and ``-``, after ``<kind>-``, so never a path or a hidden name."""
        stem = f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}"
        name, k = f"{stem}.png", 2
        while name.lower() in self._file_names:
            name, k = f"{stem}-{k}.png", k + 1
        self._file_names.add(name.lower())
        return name


ANALYSIS_FILE = "analysis.json"
"""What ``analyze`` writes beside its history (``offline.analysis.ANALYSIS_FILE``; reporting does not import
the offline layer)."""

_VARIANT_MEANING = {
    "raw": "the live model at that step",
    "avg": "the uniform weight average of the window's snapshots",
    "ens": "the vote of the window's snapshots' outputs",
}
_SELECT_CANDIDATES = {
    "avg": ": candidates avg",
    "raw": ": candidates raw",
    "any": ": candidates avg, raw, ens",
}


def _read_best(run_dir: Path) -> tuple[dict | None, str | None]:
    """``best.json`` as :func:`read_best` checks it, or why it cannot be used (the report goes on)."""
    try:
        return read_best(run_dir), None
    except (OSError, ValueError) as error:  # DamagedJSONError is a ValueError
        logger.warning("%s: the best model is left out of the report: %s", run_dir / BEST_FILE, error)
        return None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


_EVIDENCE_ROWS = (
    ("chosen", "chosen (`best.json`)"),
    ("naive", "naive: the raw checkpoint with the best selection score"),
    ("final_raw", "final raw: the newest raw checkpoint"),
    ("best_candidate", "best candidate: the best confirmation score under `select`"),
)
_INTERVAL_KEYS = ("score", "avg_minus_raw", "ens_minus_raw")


def _parse_evidence(best: dict | None) -> tuple[dict | None, str | None]:
    """``best.json``'s ``evidence`` once checked (None when there is none: an older run), or why it
    cannot be used. A hand-edited file may hold anything; the report shows only what it can format."""
    if best is None or best.get("evidence") is None:
        return None, None
    evidence = best["evidence"]
    problem = _evidence_problem(evidence)
    if problem is not None:
        logger.warning("best.json: its selection evidence is left out of the report: %s", problem)
        return None, problem
    return evidence, None


def _evidence_problem(evidence: Any) -> str | None:
    if not isinstance(evidence, dict):
        return "`evidence` is not a JSON object"
    holdout = evidence.get("holdout")
    if holdout is not None and not (is_real(holdout) and 0 < holdout < 1):
        return f"holdout {_short(holdout)!s} is neither null nor a number in (0, 1)"
    for key in ("examples", "metric"):
        if evidence.get(key) is not None and not isinstance(evidence[key], str):
            return f"{key} is not a string"
    as_of = evidence.get("as_of")
    if as_of is not None and not (is_int(as_of) and as_of >= 0):
        return "as_of is not a step"
    if evidence.get("chosen") is None:
        return "it names no chosen model"
    for key, _ in _EVIDENCE_ROWS:
        problem = _entry_problem(evidence.get(key))
        if problem is not None:
            return f"{key}: {problem}"
    regret = evidence.get("regret")
    if regret is not None and not (is_real(regret) and math.isfinite(regret)):
        return "regret is not a number"
    intervals = evidence.get("intervals")
    if intervals is not None and not isinstance(intervals, dict):
        return "intervals is not a JSON object"
    for key in _INTERVAL_KEYS:
        value = (intervals or {}).get(key)
        if value is not None and _json_interval(value) is None:
            return f"intervals.{key} is not an interval (estimate, low <= high, resamples, seed, confidence)"
    unavailable = evidence.get("unavailable")
    if unavailable is not None and not (
        isinstance(unavailable, list) and all(isinstance(task, str) for task in unavailable)
    ):
        return "unavailable is not a list of task names"
    return None


def _entry_problem(entry: Any) -> str | None:
    """What makes one model entry of the evidence unusable (None is no entry, which is fine)."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not (is_int(entry.get("step")) and entry["step"] >= 0) or not isinstance(entry.get("variant"), str):
        return "no step (an integer >= 0) and variant (a string)"
    for key in ("selection_score", "confirmation_score"):
        value = entry.get(key)
        if value is not None and not (is_real(value) and 0 <= value <= 1):
            return f"{key} is neither null nor a score in [0, 1]"
    return None


def _json_interval(value: Any) -> Interval | None:
    """An ``Interval.to_json()`` dict read back, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    numbers: list[Any] = [value.get(key) for key in ("estimate", "low", "high")]
    resamples, seed, confidence = value.get("resamples"), value.get("seed"), value.get("confidence")
    if not all(is_real(v) and math.isfinite(v) for v in numbers):
        return None
    estimate, low, high = numbers
    if low > high:
        return None
    if not (is_int(resamples) and resamples >= 1 and is_int(seed) and seed >= 0):
        return None
    if not (is_real(confidence) and 0 < confidence < 1):
        return None
    return Interval(
        estimate=float(estimate),
        low=float(low),
        high=float(high),
        resamples=int(resamples),
        seed=int(seed),
        confidence=float(confidence),
    )


def _signed(value: float) -> str:
    """``+0.012`` / ``−0.004`` (a typographic minus, as in the intervals' prose)."""
    return f"{value:+.3f}".replace("-", "\u2212")


def _interval_text(interval: Interval, *, signed: bool) -> str:
    """``+0.012 [−0.004, +0.029], 95%, 1,000 resamples, seed 0`` (unsigned for a score)."""
    form = _signed if signed else (lambda v: f"{v:.3f}")
    return (
        f"{form(interval.estimate)} [{form(interval.low)}, {form(interval.high)}], "
        f"{100 * interval.confidence:g}%, {interval.resamples:,} resamples, seed {interval.seed}"
    )


def _difference_text(interval: dict | None) -> str:
    """A recommendation row's paired difference: ``+0.012 [−0.004, +0.029]``, or n/a."""
    parsed = _json_interval(interval)
    if parsed is None:
        return "n/a"
    return f"{_signed(parsed.estimate)} [{_signed(parsed.low)}, {_signed(parsed.high)}]"


def _verdict(interval: Interval) -> str:
    """A paired difference (variant − raw) in plain words: does its interval exclude 0, and on which side."""
    if interval.low > 0:
        return "significantly better than raw"
    if interval.high < 0:
        return "significantly worse than raw"
    return "not distinguishable from raw"


def _optional_score(value: object) -> str:
    return "n/a" if value is None else _score_text(value)


def _score_text(value: object) -> str:
    """A score with 4 decimals; anything else a hand-edited ``best.json`` may hold, as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.4f}"
    return _cell(value)


def _window_text(variant: str, steps: list) -> str:
    if variant == "raw":
        return f"none: the raw model is the one snapshot of step {_cell(steps[-1])}"
    plural = "snapshot" if len(steps) == 1 else f"{len(steps)} snapshots"
    combined = "averaged" if variant == "avg" else "voted"
    return f"the {plural} {combined}, at steps {', '.join(_cell(s) for s in steps)}"


def _python_string(text: str) -> str:
    """``text`` as a double-quoted Python string literal (JSON's escapes are Python's too)."""
    return json.dumps(text, ensure_ascii=False)


_EXAMPLE_IDS = {
    "next_token": "`s{sequence}:t{position}` — the token predicted at position `t` of validation "
    "sequence `s` (both counted from 0); every predicted token is an example",
    "classification": "the example's index in the validation data (from 0)",
}


def _example_id_caption(task: str, meta: dict | None) -> str:
    kind = (meta or {}).get("kind")
    what = _EXAMPLE_IDS.get(
        str(kind),
        "the task's own example ids (by default the example's index, from 0; for an lm-eval task, the "
        "harness's `doc_id`)",
    )
    kind_text = f" (kind `{_cell(kind)}`)" if kind else ""
    return f"Example ids of task {_cell(task)}{kind_text}: {what}."


def _has_bias(record: dict) -> bool:
    """The record carries usable answer-bias fields (a crafted line may hold anything)."""
    return all(is_real(record.get(key)) and 0.0 <= record[key] <= 1.0 for key in BIAS_FIELDS)


def _changes(lines: list[dict], n_examples: int) -> list[int]:
    """Per example, how many times its score changes between consecutive lines."""
    return [
        sum(lines[t]["correct"][i] != lines[t + 1]["correct"][i] for t in range(len(lines) - 1))
        for i in range(n_examples)
    ]


def _key(row: dict) -> tuple:
    return (row["task"], row["variant"], row["window"])


def _variant_label(variant: str, window: int) -> str:
    return "raw (live model)" if variant == "raw" else f"{variant}, window {window}"


def _cell(value: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _short(value: object, limit: int = 24) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------ the files


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (or is not a directory)")
    if not (run_dir / HISTORY_FILE).is_file():
        # A Lightning / Hugging Face root directory holds the run directory as stability/.
        nested = run_dir / "stability"
        hint = f"; did you mean {nested}?" if (nested / HISTORY_FILE).is_file() else ""
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: it has no {HISTORY_FILE} (the callback writes one under its "
            f"dirpath, by default <root>/stability){hint}"
        )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"writing a report needs matplotlib, an optional extra: {INSTALL_HINT}") from error


def _is_report_file(path: Path) -> bool:
    return path.is_file() and (path.name == REPORT_FILE or path.suffix.lower() == ".png")


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an earlier report: the whole directory is swapped out.

    A symlink is refused even when it leads to a report: the swap renames the link, not what it points
    to, so the report would silently stop being where the link says."""
    if target.is_symlink():
        raise UnsafePathError(
            f"report output directory {target} is a symlink (to {os.readlink(target)}); the report replaces "
            "its directory as a whole and does not follow links: remove the link, or choose another output "
            "directory"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(
            f"report output directory {target} exists and is not a directory; remove it, or choose another "
            "output directory"
        )
    foreign = sorted(p.name for p in target.iterdir() if not _is_report_file(p))
    if foreign:
        raise ValueError(
            f"report output directory {target} holds files a report does not write "
            f"({', '.join(foreign[:5])}); it would be replaced as a whole, so choose an empty or new "
            "output_dir"
        )


def _write_new_file(directory: Path, name: str, data: bytes) -> None:
    """Create ``directory/name`` (which must not exist yet: no link is followed) and write ``data``."""
    fd = open_confined(directory, directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with open(fd, "wb") as f:
        f.write(data)


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_directory(directory)


def _sibling(target: Path, purpose: str) -> Path:
    """A free hidden name beside ``target``, unique to this process and call."""
    return target.with_name(f".{target.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}")


def _replace_directory(staging: Path, target: Path) -> None:
    """Put ``staging`` where ``target`` is: the old report is renamed aside, then removed.

    A crash between the two renames leaves no ``target`` and the old report under a hidden name, never
    a directory with half the files."""
    old = None
    _check_replaceable(target)  # again: a link may have been put there while the report was drawn
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    os.rename(staging, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
