"""Best-model selection and export: ``best.json`` points at the one export kept under ``exports/``."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from checkpoint_stability.state_dicts import CapturedState
from checkpoint_stability.storage.atomic_files import atomic_write_text, fsync_directory, fsync_tree
from checkpoint_stability.storage.confinement import writable_file
from checkpoint_stability.storage.export import (
    WEIGHTS_FILE,
    ModelExporter,
    export_target,
    fit_state_to,
    has_weights,
    load_export,
)
from checkpoint_stability.storage.json_files import DamagedJSONError, read_json_object

logger = logging.getLogger(__name__)

BEST_FILE = "best.json"
EXPORTS_DIR = "exports"
_EXPORT_NAME = re.compile(r"^step-(\d{8,})-(raw|avg|ens)$")
_CANDIDATES = {"avg": ("avg",), "raw": ("raw",), "any": ("avg", "raw", "ens")}


def export_name(step: int, variant: str) -> str:
    return f"step-{step:08d}-{variant}"


class BestModelSelector:
    """Keeps the best model of a run under a policy, exported, with a crash-safe pointer to it.

    A candidate must beat the best so far strictly. A new best is written to
    ``exports/step-<8-digit step>-<variant>/model.safetensors`` (a temporary directory renamed into place),
    then ``best.json`` is atomically replaced to point at it, then the previous export is deleted;
    on open, exports that ``best.json`` does not name are removed. A crash therefore leaves either the
    old best or the new one, never a pointer to a half-written export.

    An ensemble is not one set of weights: when ``select="any"`` lets ``ens`` win, ``best.json`` names
    the window's steps and ``path`` is ``null``.

    A best chosen under other settings (``select``, ``select_metric``, ``select_mode`` changed on a
    resume, or a run resumed without tasks) is never deleted: it stays the pointer until the new
    selection commits its first best, then moves to ``best.json``'s ``"kept"`` list, and its export
    stays on disk. Exports found beside a damaged ``best.json`` are kept the same way.

    Example::

        >>> import tempfile, torch
        >>> from checkpoint_stability.selection import BestModelSelector
        >>> from checkpoint_stability.state_dicts import capture_state
        >>> with tempfile.TemporaryDirectory() as d:
        ...     selector = BestModelSelector(d, select="avg")
        ...     record = {"step": 20, "task": "mean", "variant": "avg", "window": 5, "score": 0.6}
        ...     chosen = selector.candidate([record], snapshots_in_window=5)
        ...     weights = capture_state({"w": torch.ones(2)})
        ...     selector.commit(chosen, {"mean": 0.6}, [4, 8, 12, 16, 20], weights)
        ...     selector.best["path"], selector.best["score"]
        ('exports/step-00000020-avg', 0.6)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        select: str | None = "avg",
        metric: str = "mean",
        mode: str = "max",
        min_snapshots: int = 1,
        exporter: ModelExporter | None = None,
        holdout: float | None = None,
    ):
        """``exporter``: writes an export directory (default: ``model.safetensors`` of the whole state).
        ``holdout``: the run's holdout share; with one, candidates are compared on their
        ``selection_score`` only (the selection half), never on examples of the confirmation half."""
        if select is not None and select not in _CANDIDATES:
            raise ValueError(f"select must be one of {sorted(_CANDIDATES)} or None, got {select!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"select_mode must be 'max' or 'min', got {mode!r}")
        self.root = Path(root)
        self.select = select
        self.metric = metric
        self.mode = mode
        self.min_snapshots = min_snapshots
        self.exporter = exporter if exporter is not None else ModelExporter()
        self.holdout = holdout
        self.best: dict | None = None
        # Why the best on disk cannot be compared with this run's candidates (other settings), or None.
        self._foreign: str | None = None
        # Earlier bests that a settings change (or a damaged pointer) left behind: kept, never deleted.
        self._kept: list[dict] = []
        self._open()

    @property
    def best_path(self) -> Path | None:
        """Directory of the current best export (None before the first, or when an ensemble is best)."""
        if self.best is None or self.best.get("path") is None:
            return None
        return self.root / self.best["path"]

    def candidate(self, records: Sequence[Mapping], snapshots_in_window: int) -> Mapping | None:
        """The record of this step that beats the best so far under the policy, if any.

        ``snapshots_in_window``: how many snapshots the buffer holds; below ``min_snapshots`` nothing is
        selected, so an average of two early snapshots cannot win by accident.
        """
        if self.select is None or snapshots_in_window < self.min_snapshots:
            return None
        allowed = _CANDIDATES[self.select]
        rows = [r for r in records if r["task"] == self.metric and r["variant"] in allowed]
        if not rows:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        # Ties between variants of one step go to the earlier in (avg, raw, ens): the steadier model.
        chosen = max(rows, key=lambda r: (sign * self.selection_value(r), -allowed.index(r["variant"])))
        best_score = None
        if self.best is not None and not self._foreign and self.best.get("score") is not None:
            best_score = self.selection_value(self.best)
        if best_score is not None and not sign * self.selection_value(chosen) > sign * best_score:
            return None
        return chosen

    def selection_value(self, record: Mapping) -> float:
        """What selection compares: the selection-half score with a holdout (a task whose examples could
        not be split lends its whole score), else the score."""
        if self.holdout is not None and record.get("selection_score") is not None:
            return float(record["selection_score"])
        return float(record["score"])

    def commit(
        self,
        record: Mapping,
        scores: Mapping[str, float],
        window_steps: Sequence[int],
        weights: CapturedState | None,
    ) -> None:
        """Export ``weights`` as the new best (``None`` for an ensemble) and move the pointer to it.

        A record whose ``score`` is None (a run with no tasks) is exported as the latest model; any
        scored candidate later beats it.
        """
        step, variant = int(record["step"]), str(record["variant"])
        exports = self.root / EXPORTS_DIR
        if exports.is_symlink():
            raise ValueError(f"{exports} is a symlink; refusing to write or delete through it")
        exports.mkdir(parents=True, exist_ok=True)
        relative = None
        if weights is not None:
            name = export_name(step, variant)
            final = exports / name
            staging = exports / f".{name}.tmp-{os.getpid()}"
            _remove_tree(staging)
            staging.mkdir()
            try:
                self.exporter.write(staging, weights, {"step": str(step), "variant": variant})
                # save_pretrained writes its files without fsync; the rename below must not overtake them.
                fsync_tree(staging)
                _remove_tree(final)
                os.replace(staging, final)
                fsync_directory(exports)
            except BaseException:
                _remove_tree(staging)
                raise
            relative = f"{EXPORTS_DIR}/{name}"
        previous = self.best_path
        kept = list(self._kept)
        # A best chosen under other settings, or the unscored model of a run without tasks now beaten by
        # a scored one, is a result of its own: kept beside the new best, never deleted.
        unscored_beaten = (
            self.best is not None and self.best.get("score") is None and record["score"] is not None
        )
        if self.best is not None and (self._foreign is not None or unscored_beaten):
            kept.append(_pointer(self.best))
            previous = None
        best = {
            "path": relative,
            "step": step,
            "variant": variant,
            "window": int(record["window"]),
            "steps": [int(s) for s in window_steps],
            "score": None if record["score"] is None else float(record["score"]),
            "select": self.select,
            "metric": self.metric if record["score"] is not None else None,
            "mode": self.mode,
            "scores": {k: float(v) for k, v in scores.items()},
            "holdout": self.holdout,
        }
        if self.holdout is not None and record.get("selection_score") is not None:
            best["selection_score"] = float(record["selection_score"])
        if kept:
            best["kept"] = kept  # type: ignore[assignment]  # JSON: the pointer holds mixed values
        atomic_write_text(self.root / BEST_FILE, json.dumps(best, indent=1) + "\n", inside=self.root)
        self.best, self._kept, self._foreign = best, kept, None
        if previous is not None and previous != self.best_path:
            _remove_tree(previous)

    def record_evidence(self, evidence: Mapping | None) -> None:
        """Write ``evidence`` (:class:`~checkpoint_stability.evidence.SelectionEvidence`'s JSON: how the
        best compares on the confirmation half) into ``best.json``, atomically; nothing before a best."""
        if self.best is None or evidence is None or self.best.get("evidence") == evidence:
            return
        self.best = {**self.best, "evidence": dict(evidence)}
        self._rewrite_pointer()

    def truncate_after(self, step: int) -> None:
        """Drop a best that a resumed run has not reached yet (it belongs to the abandoned trajectory).

        Only that one: a kept best from before ``step`` survives, and the pointer moves to it."""
        newer = [entry for entry in self._kept if entry["step"] > step]
        for entry in newer:
            logger.warning(
                "the kept best model %s is newer than the resumed step %d: dropping it", entry["path"], step
            )
            if entry.get("path") is not None:
                _remove_tree(self.root / entry["path"])
        self._kept = [entry for entry in self._kept if entry["step"] <= step]
        if self.best is None or self.best["step"] <= step:
            if newer:
                self._rewrite_pointer()
            return
        logger.warning(
            "the best model (step %d, %s) is newer than the resumed step %d: dropping it and restarting "
            "selection; that export is gone",
            self.best["step"],
            self.best["variant"],
            step,
        )
        path = self.best_path
        self.best = None
        if self._kept:
            # The newest earlier best becomes the pointer again, still incomparable with new candidates.
            self.best = dict(self._kept.pop())
            self._foreign = "it was kept from before a settings change"
        self._rewrite_pointer()
        if path is not None:
            _remove_tree(path)

    def _rewrite_pointer(self) -> None:
        pointer = self.root / BEST_FILE
        if self.best is None:
            writable_file(self.root, pointer)
            pointer.unlink(missing_ok=True)
            return
        best = dict(self.best)
        best.pop("kept", None)
        if self._kept:
            best["kept"] = list(self._kept)
        atomic_write_text(pointer, json.dumps(best, indent=1) + "\n", inside=self.root)

    def _open(self) -> None:
        self.best, damaged = self._read_best()
        exports = self.root / EXPORTS_DIR
        if not exports.is_dir() or exports.is_symlink():
            return
        named = {
            Path(entry["path"]).name for entry in [self.best, *self._kept] if entry and entry.get("path")
        }
        for child in sorted(exports.iterdir()):
            if child.name in named:
                continue
            match = _EXPORT_NAME.match(child.name)
            if damaged and match and not child.is_symlink() and has_weights(child):
                # The pointer is unreadable, so nothing says this export is stale: keep it.
                logger.warning("keeping %s, which the damaged %s may have named", child, BEST_FILE)
                step = int(match.group(1))
                self._kept.append(
                    {
                        "path": f"{EXPORTS_DIR}/{child.name}",
                        "step": step,
                        "variant": match.group(2),
                        "window": None,
                        "steps": [step],
                        "score": None,  # unknown: the pointer that said it is damaged
                    }
                )
                continue
            logger.info("removing export not named by %s: %s", BEST_FILE, child)
            _remove_tree(child)

    def _read_best(self) -> tuple[dict | None, bool]:
        """The pointer on disk if usable, and whether a pointer was there but damaged."""
        path = self.root / BEST_FILE
        if not path.exists() and not path.is_symlink():
            return None, False
        try:
            writable_file(self.root, path)
            best = read_json_object(path, str(path))
            problem = _best_problem(self.root, best)
        except (OSError, ValueError) as error:
            problem = f"unreadable ({error})"
        if problem is not None:
            logger.warning("ignoring %s: %s; selection restarts (exports beside it are kept)", path, problem)
            return None, True
        for entry in best.get("kept") or []:
            trouble = _best_problem(self.root, entry, pointer=True)
            if trouble is None:
                self._kept.append(_pointer(entry))
            else:
                logger.warning("%s: dropping a kept entry (%s)", path, trouble)
        settings = {"select": self.select, "metric": self.metric, "mode": self.mode, "holdout": self.holdout}
        recorded = {
            "select": best.get("select", self.select),  # pointers written before "select" was recorded
            "metric": best.get("metric"),
            "mode": best.get("mode", "max"),
            "holdout": best.get("holdout"),  # pointers written before holdouts existed had none
        }
        if best.get("score") is None:
            return best, False  # a run without tasks exported its latest model: nothing to compare with
        if recorded != settings:
            self._foreign = ", ".join(
                f"{key} {recorded[key]!r} -> {settings[key]!r}"
                for key in settings
                if recorded[key] != settings[key]
            )
            logger.warning(
                "%s was selected under other settings (%s): it is kept (%s) and a new selection starts "
                'beside it; its first best takes the pointer and the old one moves to the "kept" list',
                path,
                self._foreign,
                best.get("path") or "an ensemble",
            )
        return best, False


def read_best(run_dir: str | os.PathLike) -> dict | None:
    """What ``<run_dir>/best.json`` says, checked, without changing anything; None when there is none.

    Raises :class:`~checkpoint_stability.storage.json_files.DamagedJSONError` (a ``ValueError``) when
    the pointer is unreadable or names no usable export."""
    root = Path(run_dir)
    try:
        best = read_json_object(root / BEST_FILE)
    except FileNotFoundError:
        return None
    problem = _best_problem(root, best)
    if problem is not None:
        raise DamagedJSONError(f"{root / BEST_FILE} cannot be used: {problem}")
    return best


def best_model_path(run_dir: str | os.PathLike) -> Path | None:
    """The directory of the best model that ``<run_dir>/best.json`` names; None when there is none.

    None before a run's first export, and when the best is an ensemble (not one set of weights:
    ``best.json``'s ``path`` is null). Read-only, so it works from any process, on a finished run or on
    one still training: a live run switches ``best.json`` atomically and only then deletes the export it
    replaced, so a path read just before a switch can vanish soon after (read again, or copy it).
    ``AutoModelForCausalLM.from_pretrained(path)`` loads a Hugging Face export; :func:`load_best` loads
    any export into a model.

    Raises :class:`~checkpoint_stability.storage.json_files.DamagedJSONError` (a ``ValueError``) when
    ``best.json`` is unreadable or names no usable export.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     print(best_model_path(d))
        None
    """
    best = read_best(run_dir)
    if best is None or best.get("path") is None:
        return None
    return Path(run_dir) / best["path"]


def load_best(
    run_dir: str | os.PathLike, model, *, strict: bool = True, prefix: str = "", best: Mapping | None = None
) -> dict:
    """Load the best model a run exported (the one ``<run_dir>/best.json`` names) into ``model``; return
    the pointer.

    ``model`` is the exported model, or the module that was trained, which holds it under ``prefix``
    (e.g. ``"model."``); tied entries a ``save_pretrained`` export leaves out are re-tied. No training
    framework is needed: this is how a script loads a finished run's best model.

    Example::

        model = MyModel()
        best = load_best("runs/exp/stability", model)
        print(best["step"], best["variant"], best["steps"])   # e.g. 7600 avg [6800, ..., 7600]
    """
    best = dict(best) if best is not None else read_best(run_dir)
    if best is None:
        raise FileNotFoundError(f"no best model has been exported yet (no {Path(run_dir) / BEST_FILE})")
    if best.get("path") is None:
        raise ValueError(
            f"the best is the ensemble of steps {best['steps']}, which is not one set of weights; "
            "use select='avg' or 'raw' to export weights"
        )
    state = load_export(Path(run_dir) / best["path"])
    target = export_target(model, state, prefix)
    target.load_state_dict(fit_state_to(state, target, prefix), strict=strict)
    return best


def _pointer(best: Mapping) -> dict:
    """A best's entry in the ``kept`` list: the pointer without its own kept list and evidence (which
    described it against the candidates of its own selection)."""
    return {key: value for key, value in best.items() if key not in ("kept", "evidence")}


def _best_problem(root: Path, best, *, pointer: bool = False) -> str | None:
    """What makes ``best`` unusable as a pointer (``pointer``: a kept entry, needing fewer fields)."""
    if not isinstance(best, dict):
        return "not a JSON object"
    fields = (
        (("step", int), ("variant", str))
        if pointer
        else (("step", int), ("variant", str), ("score", (int, float, type(None))), ("steps", list))
    )
    for key, kind in fields:
        if key not in best or not isinstance(best[key], kind) or isinstance(best[key], bool):
            return f"field {key!r} is missing or has the wrong type"
    if not pointer:
        if best.get("kept") is not None and not isinstance(best["kept"], list):
            return "field 'kept' is not a list"
        for key in ("metric", "mode", "select"):
            if best.get(key) is not None and not isinstance(best[key], str):
                return f"field {key!r} is not a string"
        if best.get("evidence") is not None and not isinstance(best["evidence"], dict):
            return "field 'evidence' is not a JSON object"
        for key in ("holdout", "selection_score"):
            value = best.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                return f"field {key!r} is not a number"
    relative = best.get("path")
    if relative is None:
        return None if best["variant"] == "ens" else "path is null for a variant with weights"
    if not isinstance(relative, str):
        return "path is not a string"
    parts = relative.split("/")
    if len(parts) != 2 or parts[0] != EXPORTS_DIR or not _EXPORT_NAME.match(parts[1]):
        return f"path {relative!r} is not exports/step-<8-digit step>-<variant> inside the run directory"
    export = root / relative
    if export.is_symlink() or (root / EXPORTS_DIR).is_symlink():
        return f"{export} is a symlink"
    if not has_weights(export):
        return f"{export} holds no {WEIGHTS_FILE} (nor a sharded index)"
    return None


def _remove_tree(path: Path) -> None:
    """Remove a file, a symlink (never what it points at) or a directory tree, if present."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError as error:
        logger.warning("could not remove %s: %s", path, error)


__all__ = ["BestModelSelector", "best_model_path", "export_name", "load_best", "load_export", "read_best"]
