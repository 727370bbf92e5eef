"""A Markdown report with PNG plots, written from a run directory alone (at train end, and by the CLI).

``write_report(run_dir)`` reads ``history.jsonl`` and ``examples/`` and writes ``<run_dir>/report/``:

* ``report.md`` — the run at a glance; the best model that ``best.json`` names (step, variant, the
  snapshots combined, its scores, its export and how to load it); a table of score, MTV and IS per
  task, variant and window over the final 20% of evaluations (the paper's protocol) and over the whole
  run; the ensemble window-size sweep; the error lines, if any;
* ``scores-<task>.png`` — each task's score over steps for raw, avg and ens, the best model's step marked
  (and ``scores-mean.png``, the mean over tasks, when there are several tasks: over one task the mean is
  that task);
* ``flips-<task>.png`` — which examples change their score over the last evaluations, raw beside avg
  and ens;
* ``window-sweep.png`` — the vote ensemble of the last ``n`` raw evaluations, n = 1, 2, 5, 10, 20,
  recomputed from the cached per-example outputs and the targets in ``examples/<task>.meta.json``: no
  model, no forward pass.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from checkpoint_stability.diagnostics import collapsed
from checkpoint_stability.ensemble import vote
from checkpoint_stability.history import EXAMPLES_DIR, HISTORY_FILE, History
from checkpoint_stability.metrics import TASK_METRICS, exact_match, instability_score, mean_total_variation
from checkpoint_stability.records import BIAS_FIELDS, MEAN_TASK, VARIANTS
from checkpoint_stability.reporting.summary import (
    RunView,
    as_view,
    final_count,
    format_number,
    format_ratio,
    series_keys,
    series_records,
    summarize,
)
from checkpoint_stability.selection import BEST_FILE, read_best
from checkpoint_stability.storage.atomic_files import fsync_directory
from checkpoint_stability.storage.confinement import UnsafePathError, open_confined
from checkpoint_stability.validation import is_real

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
    history = as_view(history)
    meta = history.meta(task)
    if meta is None:
        raise ValueError(
            f"task {task!r} has no usable {EXAMPLES_DIR}/{task}.meta.json: its targets are unknown"
        )
    size = len(meta["targets"])
    lines = [line for line in _series_lines(history, task, "raw", 1) if len(line["outputs"]) == size]
    if len(lines) < 2:
        return []
    count = final_count(len(lines), final_fraction)
    rows = []
    for n in windows:
        if n > len(lines):
            continue
        combined, scores = [], []
        for end in range(len(lines) - count, len(lines)):
            outputs = _vote_lines(lines[max(0, end - n + 1) : end + 1])
            per_example = score_outputs(outputs, meta["targets"], meta["metric"])
            combined.append(outputs)
            scores.append(math.fsum(per_example) / len(per_example))
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
            self._table()
            self._curves()
            self._flips()
            self._bias()
            self._sweep()
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
        self.md += [
            f"| task | variant | window | evaluations, final {percent}% / all | score, final {percent}% "
            f"| MTV, final {percent}% | IS, final {percent}% | MTV ÷ raw | IS ÷ raw "
            "| score, whole run | MTV, whole run | IS, whole run |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        raw = {row["task"]: row for row in final_rows if row["variant"] == "raw"}
        for row in final_rows:
            run = whole[_key(row)]
            base = raw.get(row["task"], {})
            self.md.append(
                f"| {_cell(row['task'])} | {row['variant']} | {row['window']} "
                f"| {row['evaluations']} / {row['total']} | {row['score_last']:.4f} "
                f"| {row['mtv']:.4f} | {format_number(row['is'])} "
                f"| {format_ratio(row['mtv'], base.get('mtv'))} | {format_ratio(row['is'], base.get('is'))} "
                f"| {run['score_last']:.4f} | {run['mtv']:.4f} | {format_number(run['is'])} |"
            )
        self.md += [
            "",
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
