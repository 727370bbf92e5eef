"""The end-of-run summary a user reads under the progress bar: where the results are, which model was
chosen and how to load it, and what failed how often."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PREFIX = "[stability]"
TENSORBOARD_SETTINGS = (
    "in TensorBoard set Smoothing to 0 and untick 'Ignore outliers in chart scaling': the raw curve's "
    "noise and the best peaks are what the runs raw, avg and ens are compared on"
)


def run_summary_lines(
    run_dir: Path,
    *,
    last_step: int | None,
    snapshots: int,
    window: int,
    evaluated: bool,
    best: dict | None,
    select: str | None,
    report: Path | None,
    tensorboard: Sequence[str],
    faults: Sequence[str],
) -> list[str]:
    """The lines of the summary (each starting with ``[stability]``).

    ``evaluated``: the run had tasks (else there is no score, and the best is the final average);
    ``tensorboard``: the directories the scalars went to; ``faults``: one line per kind of fault
    (:meth:`FaultPolicy.summary`).

    Example::

        >>> from pathlib import Path
        >>> lines = run_summary_lines(
        ...     Path("/runs/exp/stability"), last_step=800, snapshots=40, window=5, evaluated=True,
        ...     best={"step": 760, "variant": "avg", "steps": [680, 700, 720, 740, 760], "score": 0.512,
        ...           "metric": "mean", "path": "exports/step-00000760-avg"},
        ...     select="avg", report=Path("/runs/exp/stability/report/report.md"),
        ...     tensorboard=["/runs/exp/stability/tensorboard"], faults=[])
        >>> print("\\n".join(lines))
        [stability] run ended at step 800 after 40 snapshots (window 5); results in /runs/exp/stability
        [stability]   best model: step 760, avg of the 5 snapshots at steps 680..760, mean score 0.512
        [stability]     exported to /runs/exp/stability/exports/step-00000760-avg
        [stability]     load it: checkpoint_stability.load_best('/runs/exp/stability', model)
        [stability]   report: /runs/exp/stability/report/report.md
        [stability]   history: /runs/exp/stability/history.jsonl
        [stability]   TensorBoard: tensorboard --logdir /runs/exp/stability/tensorboard
        [stability]     in TensorBoard set Smoothing to 0 and untick 'Ignore outliers in chart scaling': the raw curve's noise and the best peaks are what the runs raw, avg and ens are compared on
    """  # noqa: E501
    at = f"at step {last_step}" if last_step is not None else "before its first snapshot"
    plural = "" if snapshots == 1 else "s"
    lines = [f"run ended {at} after {snapshots} snapshot{plural} (window {window}); results in {run_dir}"]
    lines += _best_lines(run_dir, best, select, evaluated)
    if report is not None:
        lines.append(f"  report: {report}")
    if evaluated:
        lines.append(f"  history: {run_dir / 'history.jsonl'}")
    for directory in tensorboard:
        lines.append(f"  TensorBoard: tensorboard --logdir {directory}")
    if tensorboard:
        lines.append(f"    {TENSORBOARD_SETTINGS}")
    if faults:
        kinds = f"{len(faults)} kind{'' if len(faults) == 1 else 's'}"
        lines.append(f"  faults ({kinds}; every occurrence is an error line in the history):")
        lines += [f"    {line}" for line in faults]
    return [f"{PREFIX} {line}" for line in lines]


def _best_lines(run_dir: Path, best: dict | None, select: str | None, evaluated: bool) -> list[str]:
    if select is None:
        return ["  best model: none, selection is off (select=None)"]
    if best is None:
        why = "no snapshot was scored" if evaluated else "no snapshot was averaged"
        return [f"  best model: none ({why})"]
    steps = best.get("steps") or [best["step"]]
    if best["variant"] == "raw":
        what = f"the raw model of step {best['step']}"
    else:
        span = f"{steps[0]}..{steps[-1]}" if len(steps) > 1 else str(steps[0])
        what = f"{best['variant']} of the {len(steps)} snapshots at steps {span}"
    head = f"  best model: step {best['step']}, {what}"
    if best.get("score") is not None:
        metric = best.get("metric") or "mean"
        head += f", {metric} score {best['score']:.3f}"
    elif not evaluated:
        head += " (the final window average: no tasks to select on)"
    lines = [head]
    if best.get("path") is not None:
        lines.append(f"    exported to {run_dir / best['path']}")
        lines.append(f"    load it: checkpoint_stability.load_best({str(run_dir)!r}, model)")
    return lines
