"""Every setting of checkpoint-stability, validated once and shared by the monitor and both callbacks."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_stability.holdout import HoldoutTooSmallError, check_fraction, split
from checkpoint_stability.tasks.base import Task, validate_tasks
from checkpoint_stability.validation import require_int

ENSEMBLE_CHOICES = ("vote", "mean_prob")
ON_ERROR_CHOICES = ("warn", "raise")
EVALUATION_CHOICES = ("inline", "background")
SELECT_CHOICES = ("avg", "raw", "any")
SELECT_MODE_CHOICES = ("max", "min")
ACCUMULATOR_CHOICES = ("float32", "float64")
SIMILARITY_CHOICES = ("exact", "char_f1")
STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class StabilityConfig:
    """Settings of a stability monitor.

    Every field is validated when the config is built; a bad value raises ``ValueError`` naming the
    setting and what is allowed. Both framework callbacks accept the same fields as keyword arguments.

    Example::

        >>> from checkpoint_stability import StabilityConfig
        >>> config = StabilityConfig(window=5, every_n_steps=100, storage_dtype="bfloat16")
        >>> config.storage_dtype
        torch.bfloat16
    """

    window: int = 20
    """How many of the newest snapshots the average and the ensemble combine (the paper sweeps 2-20)."""

    every_n_steps: int = 500
    """Take a snapshot, and evaluate, every this many optimizer steps."""

    average_every: int = 1
    """Evaluate the window average at every this many snapshots (the average itself is always kept
    up to date; this only thins out the ``avg`` evaluations, which cost one extra evaluation pass)."""

    ensemble: str | None = "vote"
    """How the window's cached per-example outputs are combined: ``"vote"`` (majority, any task) or
    ``"mean_prob"`` (mean choice probability, multiple-choice tasks only); ``None`` turns ``ens`` off."""

    horizon: int = 20
    """Live MTV and IS in each record are computed over this many trailing evaluations of the series."""

    storage_dtype: torch.dtype | str | None = None
    """dtype the buffered snapshots are stored in (e.g. ``"bfloat16"`` halves the disk); ``None`` keeps
    the dtype the model trains in. Only floating tensors are cast."""

    accumulator_dtype: str = "float32"
    """dtype of the running window sum: ``"float32"`` (rebuilt exactly a slice at a time, every element
    once per ``exact_sum_every`` updates, so rounding cannot drift) or ``"float64"``."""

    exact_sum_every: int | None = None
    """Every element of the running sum is rebuilt exactly from the buffered files at least once per this
    many updates, a slice at each update, which reads ``window / exact_sum_every`` of a snapshot's bytes
    from the files. ``None`` means ``8 * window``: an eighth of a snapshot read per update, and after
    1,000 snapshots of a random walk the average is as close to float64 (3.9e-7 of the largest weight)
    as with a rebuild every ``window`` updates (3.7e-7; 1.6e-6 with none). ``window`` rebuilds faster and
    reads a whole snapshot's worth at every update, which on large models costs as much as the snapshot's
    own write."""

    resum_every: dataclasses.InitVar[int | None] = None
    """Deprecated name of ``exact_sum_every`` (it read like "resume"); goes in the next release."""

    similarity: str = "exact"
    """How IS compares two outputs of one example: ``"exact"`` match or ``"char_f1"`` (free-form text)."""

    on_error: str = "warn"
    """``"warn"``: a fault at run time (disk full, a failing task, a corrupt snapshot) is logged once, the
    snapshot or task is skipped, and an error line goes to the history; ``"raise"``: it is fatal."""

    select: str | None = "avg"
    """Which variant may become the exported best model: ``"avg"``, ``"raw"``, ``"any"``; ``None``
    disables selection and export."""

    select_metric: str = "mean"
    """The score that decides the best model: ``"mean"`` (mean over tasks) or one task's name."""

    select_mode: str = "max"
    """``"max"`` if a higher score is better, ``"min"`` otherwise."""

    min_snapshots: int = 2
    """Selection starts once the buffer holds this many snapshots, or ``window`` if smaller (an average
    of two early snapshots should not win by accident)."""

    dirpath: str | os.PathLike | None = None
    """Run directory (buffer, history, exports). The framework callbacks default to
    ``<root>/stability``; the framework-free monitor needs it."""

    console: bool = True
    """Print a one-line summary per snapshot (rank 0)."""

    tensorboard: bool = True
    """Write TensorBoard scalars (to the framework's destination when there is one, else
    ``<dirpath>/tensorboard``)."""

    holdout: float | None = None
    """The share of every task's examples held out from selection (0 < holdout < 1; ``None``: none). An
    example's half is a hash of its task name and id (DESIGN.md, "Selection evidence"), the same in every
    process and on every resume. Selection reads only the *selection* half; each record also carries its
    score on the *confirmation* half, and ``best.json``, the report and the end-of-run summary compare
    the chosen checkpoint there with the raw checkpoint a user would have picked."""

    drift: bool = True
    """Measure, at each snapshot, how far the weights moved: ``‖θ_t − θ_{t−1}‖ / ‖θ_t‖`` (from the
    previous snapshot) and ``‖θ_t − θ̄‖ / ‖θ_t‖`` (from the window average), on the writer thread in the
    pass that adds the snapshot to the average, off the training path. Written to ``drift.jsonl``."""

    evaluation: str = "inline"
    """``"inline"``: every snapshot is evaluated in the training process. ``"background"``: the training
    process only snapshots (no task runs there, ``tasks`` may be omitted) and an evaluator process
    (``checkpoint-stability follow RUN_DIR``) evaluates every snapshot from the buffered files, writing
    the same records, best model and export."""

    max_pending: int | None = None
    """Background evaluation: how many snapshots beyond the window the buffer keeps on disk for an
    evaluator that lags behind (``None``: ``window``). Training never waits; past the bound the oldest
    unevaluated snapshots are dropped and the evaluator records the gap."""

    snapshot_images: int = 1
    """How many snapshot copies the training process keeps in memory: ``1`` (a push waits for the previous
    snapshot's background write) or ``2`` (the push copies into the other one and waits only for the write
    before: snapshots taken closer together than their background work then do not hold training up;
    costs one more snapshot's worth of memory, which the first snapshot's console line states)."""

    overwrite: bool = False
    """A run that is not resuming from a training checkpoint refuses a run directory holding another run's
    results (history lines, ``best.json``, buffered snapshots), so nothing is deleted on a guess;
    ``True`` replaces them. A resumed run continues in its directory whatever this says."""

    default_task_size: int = 2048
    """How many examples the default task (``tasks=None``, built from the trainer's validation data)
    keeps, the first ones in order: predicted tokens for next-token accuracy, rows for classification."""

    report: bool = True
    """Write the stability report (``<dirpath>/report/report.md`` and its plots) when training ends
    (rank 0). Needs matplotlib (the ``report`` extra); without it the report is skipped with a note.
    ``checkpoint-stability report RUN_DIR`` writes it at any time."""

    def __post_init__(self, resum_every: int | None) -> None:
        if resum_every is not None:
            warnings.warn(
                "StabilityConfig(resum_every=...) is deprecated; use exact_sum_every",
                DeprecationWarning,
                stacklevel=3,
            )
            if self.exact_sum_every is None:
                self.exact_sum_every = resum_every
        self.window = require_int("window", self.window, 1)
        self.every_n_steps = require_int("every_n_steps", self.every_n_steps, 1)
        self.average_every = require_int("average_every", self.average_every, 1)
        self.horizon = require_int("horizon", self.horizon, 2)
        self.min_snapshots = require_int("min_snapshots", self.min_snapshots, 1)
        if self.exact_sum_every is not None:
            self.exact_sum_every = require_int("exact_sum_every", self.exact_sum_every, 1)
        _require_choice("ensemble", self.ensemble, (*ENSEMBLE_CHOICES, None))
        _require_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        _require_choice("evaluation", self.evaluation, EVALUATION_CHOICES)
        if self.max_pending is not None:
            self.max_pending = require_int("max_pending", self.max_pending, 0)
        if self.snapshot_images not in (1, 2) or isinstance(self.snapshot_images, bool):
            raise ValueError(f"snapshot_images must be 1 or 2, got {self.snapshot_images!r}")
        _require_choice("select", self.select, (*SELECT_CHOICES, None))
        _require_choice("select_mode", self.select_mode, SELECT_MODE_CHOICES)
        _require_choice("accumulator_dtype", self.accumulator_dtype, ACCUMULATOR_CHOICES)
        _require_choice("similarity", self.similarity, SIMILARITY_CHOICES)
        if not isinstance(self.select_metric, str) or not self.select_metric:
            raise ValueError(f"select_metric must be 'mean' or a task name, got {self.select_metric!r}")
        self.storage_dtype = _parse_storage_dtype(self.storage_dtype)
        if self.dirpath is not None:
            if not isinstance(self.dirpath, (str, os.PathLike)) or not str(self.dirpath):
                raise ValueError(f"dirpath must be a non-empty path or None, got {self.dirpath!r}")
            self.dirpath = Path(self.dirpath)
        self.default_task_size = require_int("default_task_size", self.default_task_size, 1)
        if self.holdout is not None:
            self.holdout = check_fraction(self.holdout)
        for name in ("console", "tensorboard", "report", "overwrite", "drift"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def pending_bound(self) -> int:
        """How many evicted snapshots the buffer keeps for a lagging evaluator (background mode)."""
        return self.window if self.max_pending is None else self.max_pending

    @property
    def exact_sum_interval(self) -> int:
        """How many updates may pass before every element of the running sum is rebuilt exactly."""
        return self.exact_sum_every if self.exact_sum_every is not None else 8 * self.window

    @property
    def storage_torch_dtype(self) -> torch.dtype | None:
        """``storage_dtype`` as parsed (a name given at construction is a ``torch.dtype`` from then on)."""
        return self.storage_dtype if isinstance(self.storage_dtype, torch.dtype) else None

    @property
    def accumulator_torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.accumulator_dtype == "float64" else torch.float32

    def no_snapshot_message(self, owner: str, start_step: int, last_step: int) -> str | None:
        """What to tell a user whose run, from ``start_step`` to ``last_step``, reaches no snapshot step.

        >>> StabilityConfig(every_n_steps=50).no_snapshot_message("StabilityCallback", 0, 40)[:42]
        'StabilityCallback: every_n_steps=50, but t'
        """
        every = self.every_n_steps
        if (start_step // every + 1) * every <= last_step:
            return None
        return (
            f"{owner}: every_n_steps={every}, but this run ends at optimizer step {last_step} (from step "
            f"{start_step}), so no snapshot will be taken; lower every_n_steps"
        )

    def check_tasks(self, tasks: Sequence[Task]) -> list[Task]:
        """The tasks, checked against these settings: the Task protocol and unique names, a
        ``select_metric`` that names a task (or ``"mean"``), and choice probabilities where
        ``ensemble="mean_prob"`` needs them, and with ``holdout`` at least 2 examples in each half of every
        task whose example ids are known before it runs. Raises ``ValueError`` naming the problem."""
        tasks = validate_tasks(tasks)
        if self.holdout is not None:
            for task in tasks:
                ids = getattr(task, "example_ids", None)
                if isinstance(ids, list):
                    try:
                        split(task.name, ids, self.holdout)
                    except HoldoutTooSmallError:
                        raise
                    except ValueError:
                        pass  # ids that cannot be hashed: confirmation is unavailable for this task
        names = [task.name for task in tasks]
        if tasks and self.select_metric not in ("mean", *names):
            raise ValueError(
                f"select_metric {self.select_metric!r} is neither 'mean' nor the name of a task ({names})"
            )
        if self.ensemble == "mean_prob":
            for task in tasks:
                if task.kind not in ("multiple_choice", "classification", "lm_eval", "function"):
                    raise ValueError(
                        f"ensemble='mean_prob' needs choice probabilities, which task {task.name!r} "
                        f"(kind {task.kind!r}) does not produce; use ensemble='vote'"
                    )
        return tasks

    def replace(self, **changes) -> StabilityConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """The settings as JSON-serialisable values (for the run directory and callback state)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = _dtype_name(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_settings(cls, owner: str, settings: dict) -> StabilityConfig:
        """A config from keyword settings; an unknown name raises ``TypeError`` listing the settings."""
        unknown = sorted(set(settings) - set(cls.field_names()) - {"resum_every"})  # deprecated alias
        if unknown:
            raise TypeError(
                f"{owner} got unknown setting(s) {', '.join(map(repr, unknown))}; the settings are "
                f"{', '.join(cls.field_names())}"
            )
        return cls(**settings)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _require_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


def _parse_storage_dtype(value) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in STORAGE_DTYPES.values():
            return value
    elif isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in STORAGE_DTYPES:
            return STORAGE_DTYPES[key]
    allowed = ", ".join(repr(k) for k in STORAGE_DTYPES)
    raise ValueError(f"storage_dtype must be None (as trained) or one of {allowed}; got {value!r}")
