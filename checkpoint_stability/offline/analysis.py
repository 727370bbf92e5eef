"""Offline analysis of a saved series of checkpoints, as the paper does it (arXiv 2510.04848).

For every checkpoint of the series, in step order, and every window size ``w``:

* ``raw`` (window 1): the checkpoint itself, evaluated once;
* ``avg`` (window ``w``): the uniform average of the last ``min(w, k)`` checkpoints (``k`` = checkpoints
  so far), streamed tensor by tensor into the model;
* ``ens`` (window ``w``): the raw outputs of those checkpoints combined per example (``vote`` or
  ``mean_prob``) and re-scored: no model call.

Results go to the same files the live monitor writes (``history.jsonl`` and ``examples/``, one record
per (step, task, variant, window), with live MTV and IS over the trailing ``horizon`` evaluations of
each (task, variant, window) series and the ``mean`` over tasks), so the same report reads both.

A run directory can be resumed: what it already holds for a (step, task, variant, window) is not
evaluated again, and stored raw outputs feed the ensembles. A rerun may add checkpoints after the last
one, or windows; it refuses a different series, task list or ensemble setting (``analysis.json`` records
them), since the stored windows would then mean something else.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import reprlib
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.ensemble import ensemble_result
from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.history import EXAMPLES_DIR, HISTORY_FILE, History
from checkpoint_stability.holdout import HoldoutScorer
from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.records import CHOICE_KINDS, Evaluation, ScoreSeries
from checkpoint_stability.storage.atomic_files import atomic_write_text
from checkpoint_stability.storage.checkpoint_files import (
    Checkpoint,
    ModelLoader,
    check_series,
    resolve_checkpoint,
)
from checkpoint_stability.storage.confinement import UnsafePathError, is_inside, writable_file
from checkpoint_stability.storage.json_files import DamagedJSONError, read_json_object
from checkpoint_stability.storage.run_lock import LOCK_FILE, RunLock
from checkpoint_stability.tasks.base import Task, TaskResult, validate_task_name
from checkpoint_stability.tasks.next_token import NextTokenTask
from checkpoint_stability.validation import is_int

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS = (1, 2, 5, 10, 20)
ANALYSIS_FILE = "analysis.json"
REPORT_DIR = "report"
# Trainer checkpoints are "checkpoint-<N>" directories; this library's snapshots "step-<N>.safetensors".
STEP_NAME = re.compile(r"(?:checkpoint|step)-(\d+)")
TRAINER_STATE = "trainer_state.json"


class AnalysisError(CheckpointStabilityError, ValueError):
    """A series or run directory that cannot be analysed as asked (the message says why)."""


@dataclass(frozen=True)
class Series:
    """Checkpoints in step order, with where the steps came from."""

    checkpoints: list[Checkpoint]
    steps: list[int]
    step_source: str
    """``"names"`` (``checkpoint-<N>`` / ``step-<N>`` names or ``trainer_state.json``) or ``"positions"``."""


@dataclass(frozen=True)
class AnalysisResult:
    """What :func:`analyze` did."""

    run_dir: Path
    steps: list[int]
    evaluations: int
    """Task evaluations run (``task.evaluate`` calls)."""
    skipped: int
    """Task evaluations not run because the run directory already held their results."""
    records_written: int
    report: Path | None


# ------------------------------------------------------------------------------------------------- steps


def checkpoint_step(checkpoint: Checkpoint) -> int | None:
    """The optimizer step of a checkpoint, if its name or its Trainer state says it.

    A directory (or file) named ``checkpoint-<N>`` or ``step-<N>`` is step ``N`` (a bare file inside such
    a directory too); otherwise ``global_step`` from a ``trainer_state.json`` beside the weights. A
    ``trainer_state.json`` that cannot be read (not JSON, nested too deeply, not a regular file) leaves
    the step unknown, with a warning naming it.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.zeros(1)}, f"{d}/step-00000300.safetensors")
    ...     checkpoint_step(resolve_checkpoint(f"{d}/step-00000300.safetensors"))
    300
    """
    if checkpoint.layout == "file" or checkpoint.directory is None:
        names = [checkpoint.path.stem, checkpoint.path.parent.name]
    else:
        names = [checkpoint.directory.name]
    for name in names:
        match = STEP_NAME.fullmatch(name)
        if match:
            return int(match.group(1))
    folder = checkpoint.directory or checkpoint.path.parent
    try:
        state = read_json_object(folder / TRAINER_STATE)
    except FileNotFoundError:
        return None
    except DamagedJSONError as error:
        logger.warning("%s; the step of %s is unknown", error, checkpoint.path)
        return None
    step = state.get("global_step")
    return step if type(step) is int and step >= 0 else None


def order_series(checkpoints: Sequence[str | os.PathLike | Checkpoint]) -> Series:
    """Resolve checkpoint arguments and put them in step order.

    When every checkpoint has a step (:func:`checkpoint_step`), the series is sorted by it (a shell glob
    puts ``checkpoint-1000`` before ``checkpoint-500``); otherwise the checkpoints keep the order given
    and their steps are their positions 1..N.

    Raises:
        CheckpointError: a checkpoint that cannot be read.
        AnalysisError: no checkpoints, or two checkpoints with the same step.
    """
    resolved = [resolve_checkpoint(c) for c in checkpoints]
    if not resolved:
        raise AnalysisError("no checkpoints given")
    steps = [checkpoint_step(c) for c in resolved]
    if any(step is None for step in steps):
        with_step = [c.path for c, step in zip(resolved, steps, strict=True) if step is not None]
        if with_step:
            logger.warning(
                "%d of %d checkpoints have no step in their name or trainer_state.json; using positions "
                "1..%d in the order given for all of them",
                len(resolved) - len(with_step),
                len(resolved),
                len(resolved),
            )
        return Series(resolved, list(range(1, len(resolved) + 1)), "positions")
    known = [step for step in steps if step is not None]  # every checkpoint has one here
    order = sorted(range(len(resolved)), key=lambda i: known[i])
    for a, b in itertools.pairwise(order):
        if known[a] == known[b]:
            raise AnalysisError(
                f"checkpoints {resolved[a].path} and {resolved[b].path} are both step {known[a]}"
            )
    return Series([resolved[i] for i in order], [known[i] for i in order], "names")


# ------------------------------------------------------------------------------------------------- models


def huggingface_model_factory(
    directory: str | os.PathLike, *, from_config: bool = False, device: str | torch.device = "cpu"
) -> Callable[[], torch.nn.Module]:
    """A factory for the model checkpoints are loaded into: ``AutoModelForCausalLM`` from a local
    directory (its weights with ``from_pretrained``, or only its config with ``from_config``).

    Local files only: nothing is downloaded.
    """
    directory = Path(directory)

    def build() -> torch.nn.Module:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as error:
            raise ImportError(
                "building a model from a Hugging Face directory needs transformers: "
                "pip install checkpoint-stability[transformers]"
            ) from error
        if not (directory / "config.json").is_file():
            raise AnalysisError(f"{directory} has no config.json to build the model from")
        from transformers.utils import logging as transformers_logging

        # Its per-load bar would break into the analysis's own progress bar.
        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            if from_config:
                config = AutoConfig.from_pretrained(directory, local_files_only=True)
                model = AutoModelForCausalLM.from_config(config)
            else:
                model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        finally:
            if bar_was_on:
                transformers_logging.enable_progress_bar()
        return model.to(device).eval()

    return build


# ------------------------------------------------------------------------------------------------- text

# Tokens read past the ones a text task keeps, then to the end of that line: the tokens kept never come
# from near the end of the text read, where cutting the file could change how it is tokenized.
TEXT_MARGIN_TOKENS = 64


def text_task(
    path: str | os.PathLike,
    tokenizers: Sequence[tuple[str, object]],
    *,
    name: str | None = None,
    block_size: int = 128,
    max_tokens: int = 2048,
    batch_size: int = 8,
    vocab_size: int | None = None,
) -> NextTokenTask:
    """A :class:`NextTokenTask` on a held-out plain-text file: next-token accuracy on its first tokens.

    The text (UTF-8, a byte-order mark ignored) is tokenized without special tokens, cut into
    consecutive sequences of ``block_size`` tokens (the last one may be shorter), and the first
    ``max_tokens`` predicted tokens are kept (each sequence predicts all its tokens but the first). The
    file is read only as far as those tokens need, plus a margin of :data:`TEXT_MARGIN_TOKENS` tokens
    and the rest of that line, so a large file costs no more than a small one.

    Args:
        path: the text file.
        tokenizers: ``(where it comes from, tokenizer)`` pairs, Hugging Face tokenizers; every one must
            turn the text into the same token ids (an ensemble compares outputs example by example, so
            every checkpoint must see the same examples).
        name: the task name (default: the file's stem).
        vocab_size: the model's vocabulary size, if known: token ids at or above it are refused.

    Raises:
        AnalysisError: the file is missing, empty, not UTF-8 or too short, or the tokenizers disagree.
    """
    path = Path(path)
    name = path.stem if name is None else name
    try:
        validate_task_name(name)
    except ValueError as error:
        raise AnalysisError(f"text file {path}: {error}") from None
    if not tokenizers:
        raise AnalysisError(f"text file {path}: no tokenizer to tokenize it with")
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one token to predict), got {block_size}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    full, rest = divmod(max_tokens, block_size - 1)
    needed = full * block_size + (rest + 1 if rest else 0)
    (first_source, first), others = tokenizers[0], tokenizers[1:]
    text, ids = _read_tokens(path, first, needed + TEXT_MARGIN_TOKENS)
    for source, tokenizer in others:
        theirs = _encode(tokenizer, text)
        if theirs != ids:
            at = next((t for t, (a, b) in enumerate(zip(ids, theirs, strict=False)) if a != b), None)
            where = (
                f"first at token {at}: {ids[at]} vs {theirs[at]}"
                if at is not None
                else f"{len(ids)} vs {len(theirs)} tokens"
            )
            raise AnalysisError(
                f"text file {path}: the tokenizers of {first_source} and {source} tokenize it differently "
                f"({where}); every checkpoint must be evaluated on the same tokens, so pass --tokenizer DIR "
                "to use one tokenizer for all"
            )
    ids = ids[:needed]
    if len(ids) < 2:
        raise AnalysisError(f"text file {path} holds {len(ids)} token(s); 2 are needed to predict one")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise AnalysisError(
            f"text file {path}: the tokenizer of {first_source} gives the id {max(ids)}, but the model has "
            f"{vocab_size} tokens; the tokenizer does not belong to this model"
        )
    blocks = [ids[start : start + block_size] for start in range(0, len(ids), block_size)]
    blocks = [block for block in blocks if len(block) >= 2]
    return NextTokenTask(name, blocks, max_tokens=max_tokens, batch_size=batch_size)


def _read_tokens(path: Path, tokenizer, wanted: int) -> tuple[str, list[int]]:
    """The start of the text, ending at a line end, holding at least ``wanted`` tokens (or all of it),
    and its tokens."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise AnalysisError(f"text file {path} {what}")
    chars = max(4096, 8 * wanted)  # a few characters per token is typical; the loop reads on if not
    try:
        with open(path, encoding="utf-8-sig") as file:
            text, ended = "", False
            while True:
                chunk = file.read(chars)
                line = "" if len(chunk) < chars else file.readline()
                ended = len(chunk) < chars or not line.endswith("\n")
                text += chunk + line
                ids = _encode(tokenizer, text)
                if ended or len(ids) >= wanted:
                    break
                chars = len(text)  # double what is read
    except UnicodeDecodeError as error:
        raise AnalysisError(
            f"text file {path} is not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x})"
        ) from None
    except OSError as error:
        raise AnalysisError(f"text file {path} cannot be read: {error.strerror or error}") from None
    if not text.strip():
        raise AnalysisError(f"text file {path} is empty")
    return text, ids


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a text longer than the tokenizer's model_max_length is expected here (it is cut up).
    return [int(token) for token in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]


# ------------------------------------------------------------------------------------------------- analyze


def analyze(
    checkpoints: Sequence[str | os.PathLike | Checkpoint],
    tasks: Sequence[Task],
    run_dir: str | os.PathLike,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    model_factory: Callable[[], torch.nn.Module] | None = None,
    ensemble: str = "vote",
    horizon: int = 20,
    similarity: str = "exact",
    progress: bool = True,
    report: bool = True,
    holdout: float | None = None,
) -> AnalysisResult:
    """Evaluate raw checkpoints, window averages and window ensembles; write history and report.

    Args:
        checkpoints: model directories, ``.safetensors`` files or index JSONs; ordered by step (see
            :func:`order_series`).
        tasks: the tasks to evaluate (``task.evaluate(model)``); at least one.
        run_dir: where ``history.jsonl``, ``examples/``, ``analysis.json`` and ``report/`` go; an
            existing one is resumed.
        windows: window sizes; 1 is the raw series (always evaluated: ensembles need it), each larger
            size adds an ``avg`` and an ``ens`` series.
        model_factory: builds the model every checkpoint is loaded into (once; weights are then copied
            in place). Default: ``AutoModelForCausalLM.from_pretrained`` of the first checkpoint, which
            must then be a model directory.
        ensemble: ``"vote"`` or ``"mean_prob"``, as in the live monitor.
        horizon: trailing evaluations over which a record's MTV and IS are computed.
        similarity: ``"exact"`` or ``"char_f1"`` for IS.
        progress: a tqdm bar on stderr over the model evaluations.
        report: write the report (``checkpoint_stability.reporting.report.write_report``) at the end.
        holdout: as the live monitor's: every record also carries its score on the selection and the
            confirmation half of each task's examples (``selection_score``, ``confirmation_score``).

    An average over a single checkpoint is that checkpoint, and windows that hold the same checkpoints
    (``min(w, k)`` equal) share one evaluation.

    Raises:
        ValueError: bad settings or tasks. CheckpointError: unreadable or mismatched checkpoints.
        AnalysisError: a run directory analysed with another series, tasks or ensemble settings.
    """
    windows = check_windows(windows)
    config = StabilityConfig(ensemble=ensemble, horizon=horizon, similarity=similarity, holdout=holdout)
    if config.ensemble is None:
        raise ValueError("ensemble must be 'vote' or 'mean_prob' for an analysis")
    tasks = config.check_tasks(tasks)
    if not tasks:
        raise ValueError("analyze needs at least one task")
    series = order_series(checkpoints)
    check_series(series.checkpoints)
    if model_factory is None:
        first = series.checkpoints[0]
        if first.layout == "file" or first.directory is None:
            raise AnalysisError(
                f"{first.path} is a bare safetensors file: say which model it belongs to "
                "(model_factory=, or --model-config DIR on the command line)"
            )
        model_factory = huggingface_model_factory(first.directory)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_output_paths(run_dir, [task.name for task in tasks], report=report)
    # Two analyses (or an analysis and a live run) writing one directory would interleave histories.
    lock = RunLock(run_dir)
    try:
        _claim(run_dir, series, tasks, windows, config)
        run = _Run(series, tasks, History(run_dir), windows, config, model_factory, progress)
        run.run()
    finally:
        lock.release()
    report_path = None
    if report:
        report_path = _write_report(run_dir)
    return AnalysisResult(
        run_dir, series.steps, run.evaluations, run.skipped, run.records_written, report_path
    )


def check_windows(windows: Sequence[int]) -> list[int]:
    """Sorted distinct window sizes, each an integer >= 1.

    >>> check_windows([5, 1, 2, 5])
    [1, 2, 5]
    """
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or not windows:
        raise ValueError(f"windows must be a non-empty list of integers >= 1, got {windows!r}")
    for w in windows:
        if not is_int(w) or w < 1:
            raise ValueError(f"window sizes must be integers >= 1, got {w!r}")
    return sorted({int(w) for w in windows})


def check_output_paths(run_dir: Path, task_names: Sequence[str], *, report: bool = True) -> None:
    """Refuse, before anything is evaluated, a run directory where analyze would write through a link.

    Every file analyze writes or repairs (``analysis.json``, ``lock.json``, ``history.jsonl``,
    ``examples/<task>.jsonl`` and ``.meta.json``) must be missing or a regular file, not a link, in a
    folder inside ``run_dir``; ``examples/`` must not lead outside it, and ``report/`` must not be a link
    or a file (the report replaces it as a whole). The writers check again when they open each file.

    Raises:
        UnsafePathError: naming the first path that breaks the rule.
    """
    examples = run_dir / EXAMPLES_DIR
    if examples.is_symlink() and not is_inside(examples, run_dir):
        raise UnsafePathError(
            f"{examples} is a symlink to {os.path.realpath(examples)}, outside the run directory; analyze "
            "writes its files inside the run directory only (remove the link, or use another run directory)"
        )
    if examples.exists() and not examples.is_dir():
        raise UnsafePathError(f"{examples} is not a directory; analyze writes its examples files there")
    paths = [run_dir / ANALYSIS_FILE, run_dir / LOCK_FILE, run_dir / HISTORY_FILE]
    for name in task_names:
        paths += [examples / f"{name}.jsonl", examples / f"{name}.meta.json"]
    for path in paths:
        writable_file(run_dir, path)
    if report:
        directory = run_dir / REPORT_DIR
        if directory.is_symlink():
            raise UnsafePathError(
                f"{directory} is a symlink (to {os.readlink(directory)}); the report replaces its directory "
                "as a whole and does not follow links (remove the link, or pass --no-report)"
            )
        if directory.exists() and not directory.is_dir():
            raise UnsafePathError(
                f"{directory} is not a directory; the report is written there (remove it, or pass "
                "--no-report)"
            )


def _write_report(run_dir: Path) -> Path | None:
    try:
        from checkpoint_stability.reporting.report import write_report
    except ImportError as error:
        logger.warning("no report written (%s); the history is complete in %s", error, run_dir)
        return None
    return write_report(run_dir)


def _claim(run_dir: Path, series: Series, tasks: list[Task], windows: list[int], config) -> None:
    """Record what this run directory analyses; refuse to mix in a different analysis."""
    now = {
        "checkpoints": [
            {"step": step, "name": _display_name(c)}
            for step, c in zip(series.steps, series.checkpoints, strict=True)
        ],
        "step_source": series.step_source,
        "tasks": sorted(task.name for task in tasks),
        "windows": windows,
        "ensemble": config.ensemble,
        "horizon": config.horizon,
        "similarity": config.similarity,
        "holdout": config.holdout,
    }
    path = run_dir / ANALYSIS_FILE
    if path.exists():
        before = _read_analysis(path)
        for key in ("tasks", "ensemble", "horizon", "similarity", "step_source", "holdout"):
            if before.get(key) != now[key]:  # (an analysis.json from before holdouts has none: None)
                raise AnalysisError(
                    f"{run_dir} was analysed with {key}={before.get(key)!r}, now {now[key]!r}; "
                    "use the same settings to resume, or a new run directory"
                )
        old, new = before.get("checkpoints", []), now["checkpoints"]
        for position, (a, b) in enumerate(zip(old, new, strict=False)):
            if a != b:
                raise AnalysisError(
                    f"{run_dir} was analysed with another series: checkpoint {position + 1} was "
                    f"{a['name']} (step {a['step']}), now {b['name']} (step {b['step']}). Windows would "
                    "mix different checkpoints; a rerun may only add checkpoints after the last one. "
                    "Use a new run directory"
                )
        if len(old) > len(new):
            now["checkpoints"] = old
        now["windows"] = sorted(set(before.get("windows", [])) | set(windows))
    elif (run_dir / HISTORY_FILE).is_file() and (run_dir / HISTORY_FILE).stat().st_size > 0:
        raise AnalysisError(
            f"{run_dir} holds a history that analyze did not write (a live run?); use a new run directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(now, indent=1) + "\n", inside=run_dir)


def _read_analysis(path: Path) -> dict:
    """``analysis.json`` as :func:`_claim` wrote it; :class:`AnalysisError` naming the file and what is wrong
    with it otherwise (not JSON, nested too deeply, not an object, a key missing or of the wrong type)."""
    try:
        before = read_json_object(path)
    except DamagedJSONError as error:
        raise AnalysisError(f"{error}; use a new run directory") from None

    def wrong(key: str, expected: str) -> AnalysisError:
        if key not in before:
            return AnalysisError(
                f"{path} has no {key!r}, so it was not written by analyze; use a new run directory"
            )
        return AnalysisError(
            f"{path}: {key!r} must be {expected}, got {_shown(before[key])}; the file is damaged, use a new "
            "run directory"
        )

    def is_int(value: object, minimum: int) -> bool:
        return type(value) is int and value >= minimum

    for key in ("tasks",):
        if not (isinstance(before.get(key), list) and all(isinstance(v, str) for v in before[key])):
            raise wrong(key, "a list of task names")
    for key in ("ensemble", "similarity", "step_source"):
        if not isinstance(before.get(key), str):
            raise wrong(key, "a string")
    if not is_int(before.get("horizon"), 0):
        raise wrong("horizon", "an integer")
    holdout = before.get("holdout")
    if holdout is not None and (type(holdout) is not float or not 0 < holdout < 1):
        raise wrong("holdout", "null or a number strictly between 0 and 1")
    windows = before.get("windows")
    if not (isinstance(windows, list) and all(is_int(w, 1) for w in windows)):
        raise wrong("windows", "a list of integers >= 1")
    checkpoints = before.get("checkpoints")
    if not (
        isinstance(checkpoints, list)
        and all(
            isinstance(c, dict)
            and set(c) == {"step", "name"}
            and is_int(c["step"], 0)
            and isinstance(c["name"], str)
            for c in checkpoints
        )
    ):
        raise wrong("checkpoints", 'a list of {"step": integer, "name": string}')
    return before


def _shown(value: object) -> str:
    # reprlib: bounded in depth and length, so a deeply nested value cannot exhaust the stack.
    return reprlib.repr(value)


def _display_name(checkpoint: Checkpoint) -> str:
    folder = checkpoint.directory
    return folder.name if checkpoint.layout != "file" and folder is not None else checkpoint.path.name


class _Run:
    """One pass over the series in step order; everything already stored is reused, not recomputed."""

    def __init__(
        self,
        series: Series,
        tasks: list[Task],
        history: History,
        windows: Sequence[int],
        config: StabilityConfig,
        model_factory: Callable[[], torch.nn.Module],
        show_progress: bool,
    ) -> None:
        self.series: Series = series
        self.tasks: list[Task] = tasks
        self.history: History = history
        self.windows = [w for w in windows if w > 1]
        self.config = config
        self.model_factory = model_factory
        self.show_progress = show_progress
        self.model: torch.nn.Module | None = None
        self.loader: ModelLoader | None = None
        self.evaluations = 0
        self.skipped = 0
        self.records_written = 0
        self.position = {step: k for k, step in enumerate(series.steps)}
        self.recorded = {(r["step"], r["task"], r["variant"], r["window"]): r for r in history.records()}
        # Stored results: (task, step, variant, window) -> TaskResult; and avg ones by models held.
        self.stored: dict[tuple, TaskResult] = {}
        self.stored_avg: dict[tuple, TaskResult] = {}
        for task in tasks:
            meta = history.meta(task.name)
            if meta is None:
                continue
            _check_same_task(task, meta, history.root)
            for line in history.outputs(task.name):
                result = _result_from_line(line, meta)
                k = self.position.get(line["step"])
                if result is None or k is None:
                    continue
                self.stored[(task.name, line["step"], line["variant"], line["window"])] = result
                if line["variant"] == "avg":
                    self.stored_avg[(task.name, line["step"], min(line["window"], k + 1))] = result
        self.score_series = ScoreSeries(config.horizon, config.similarity)
        self.holdout = HoldoutScorer(config.holdout) if config.holdout is not None else None

    # ------------------------------------------------------------------ planning

    def _jobs(self) -> list[tuple[int, str, int, list[Task]]]:
        """The model evaluations still needed: (position, "raw" | "avg", models averaged, tasks)."""
        jobs = []
        for k, step in enumerate(self.series.steps):
            raw = [t for t in self.tasks if (t.name, step, "raw", 1) not in self.stored]
            if raw:
                jobs.append((k, "raw", 1, raw))
            by_models: dict[int, list[Task]] = {}
            for w in self.windows:
                n = min(w, k + 1)
                for t in self.tasks:
                    if (
                        n == 1
                        or (t.name, step, "avg", w) in self.stored
                        or (t.name, step, n) in self.stored_avg
                    ):
                        continue
                    needing = by_models.setdefault(n, [])
                    if t not in needing:
                        needing.append(t)
            jobs.extend((k, "avg", n, needing) for n, needing in sorted(by_models.items()))
            # From scratch: the raw evaluation plus one per distinct number of averaged checkpoints.
            from_scratch = 1 + len({min(w, k + 1) for w in self.windows} - {1})
            needed = len(raw) + sum(len(needing) for needing in by_models.values())
            self.skipped += from_scratch * len(self.tasks) - needed
        return jobs

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        jobs = self._jobs()
        if self.skipped:
            logger.info(
                "%d task evaluations are already in %s; skipping them", self.skipped, self.history.root
            )
        from tqdm import tqdm

        bar = tqdm(
            total=len(jobs), desc="analyze", unit="eval", file=sys.stderr, disable=not self.show_progress
        )
        by_position: dict[int, list] = {}
        for job in jobs:
            by_position.setdefault(job[0], []).append(job)
        raw_window: dict[str, deque[TaskResult]] = {
            t.name: deque(maxlen=max([1, *self.windows])) for t in self.tasks
        }
        try:
            for k, step in enumerate(self.series.steps):
                evaluated: dict[tuple, TaskResult] = {}
                for _, kind, n, needing in by_position.get(k, []):
                    bar.set_postfix_str(f"step {step} {kind}" + (f" of {n}" if kind == "avg" else ""))
                    self._load(k, kind, n)
                    for task in needing:
                        evaluated[(task.name, kind, n)] = self._evaluate(task)
                    bar.update(1)
                results = {}
                for task in self.tasks:
                    raw = self.stored.get((task.name, step, "raw", 1)) or evaluated[(task.name, "raw", 1)]
                    raw_window[task.name].append(raw)
                    results[(task.name, "raw", 1)] = raw
                    for w in self.windows:
                        n = min(w, k + 1)
                        results[(task.name, "avg", w)] = (
                            self.stored.get((task.name, step, "avg", w))
                            or self.stored_avg.get((task.name, step, n))
                            or (raw if n == 1 else evaluated[(task.name, "avg", n)])
                        )
                        results[(task.name, "ens", w)] = self.stored.get(
                            (task.name, step, "ens", w)
                        ) or self._ensemble(task, list(raw_window[task.name])[-n:])
                self._write(step, k, results)
        finally:
            bar.close()

    def _load(self, k: int, kind: str, n: int) -> None:
        if self.loader is None:
            self.model = self.model_factory()
            self.loader = ModelLoader(self.model, self.series.checkpoints[0])
        if kind == "raw":
            self.loader.load(self.series.checkpoints[k])
        else:
            self.loader.load_average(self.series.checkpoints[k - n + 1 : k + 1])

    def _evaluate(self, task: Task) -> TaskResult:
        if self.model is None:
            raise RuntimeError("no checkpoint has been loaded yet")
        with isolated_evaluation(self.model):
            result = task.evaluate(self.model)
        if not isinstance(result, TaskResult):
            raise TypeError(
                f"task {task.name!r}: evaluate returned {type(result).__name__}, not a TaskResult"
            )
        self.evaluations += 1
        return result

    def _ensemble(self, task: Task, window: list[TaskResult]) -> TaskResult:
        # analyze() refuses ensemble=None before a run is made
        return ensemble_result(self.config.ensemble or "vote", task, window)

    # ------------------------------------------------------------------ writing

    def _write(self, step: int, k: int, results: dict[tuple, TaskResult]) -> None:
        """Outputs lines first, then the step's records in one append: a record implies its outputs."""
        evaluations = []
        pairs = [("raw", 1)] + [(variant, w) for w in self.windows for variant in ("avg", "ens")]
        for variant, window in pairs:
            n_models = 1 if variant == "raw" else min(window, k + 1)
            for task in self.tasks:
                result = results[(task.name, variant, window)]
                if (task.name, step, variant, window) not in self.stored:
                    self.history.append_result(task, step, variant, window, result)
                targets = result.targets if task.kind in CHOICE_KINDS else None
                halves = None
                if self.holdout is not None:
                    halves = self.holdout.scores(task.name, result.example_ids, result.correct)
                evaluations.append(
                    Evaluation(
                        task.name, variant, window, n_models, result.score, result.outputs, targets, halves
                    )
                )
        known = {(t, v, w): r for (s, t, v, w), r in self.recorded.items() if s == step}
        step_records = self.score_series.step_records(
            step, evaluations, [t.name for t in self.tasks], time.time(), known
        )
        records = [r for r in step_records if (r["task"], r["variant"], r["window"]) not in known]
        if records:
            self.history.append_many(records)
            self.records_written += len(records)


def _check_same_task(task: Task, meta: dict, run_dir: Path) -> None:
    """Refuse a task whose definition changed since the run directory recorded it: stored results would
    otherwise be reused for a different task. Examples are compared when the task exposes them."""
    changed = [key for key in ("kind", "metric") if getattr(task, key) != meta[key]]
    for key in ("example_ids", "targets"):
        value = getattr(task, key, None)
        if isinstance(value, (list, tuple)) and json.loads(json.dumps(list(value))) != meta[key]:
            changed.append(key)
    if changed:
        raise AnalysisError(
            f"task {task.name!r} differs from the one recorded in {run_dir} ({', '.join(changed)} changed); "
            "use a new run directory or another task name"
        )


def _result_from_line(line: dict, meta: dict) -> TaskResult | None:
    """A stored examples line as a TaskResult (targets and ids from the task's meta), or None if damaged."""
    try:
        return TaskResult(
            outputs=line["outputs"],
            correct=line["correct"],
            targets=meta["targets"],
            example_ids=meta["example_ids"],
            choice_logprobs=line.get("choice_logprobs"),
        )
    except (ValueError, TypeError):
        return None
