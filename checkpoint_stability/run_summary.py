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
    if best is not None and isinstance(best.get("evidence"), dict):
        lines += evidence_lines(best["evidence"])
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
        if best.get("selection_score") is not None:
            head += f" (selection half {best['selection_score']:.3f})"
    elif not evaluated:
        head += " (the final window average: no tasks to select on)"
    lines = [head]
    if best.get("path") is not None:
        lines.append(f"    exported to {run_dir / best['path']}")
        lines.append(f"    load it: checkpoint_stability.load_best({str(run_dir)!r}, model)")
    return lines


def evidence_lines(evidence: dict) -> list[str]:
    """How the chosen checkpoint compares on the confirmation half (``best.json``'s ``evidence``).

    >>> interval = {"estimate": 0.02, "low": -0.01, "high": 0.05, "confidence": 0.95}
    >>> evidence = {"holdout": 0.5, "examples": "confirmation", "metric": "mean", "regret": 0.004,
    ...     "chosen": {"step": 40, "variant": "avg", "confirmation_score": 0.512},
    ...     "naive": {"step": 25, "variant": "raw", "confirmation_score": 0.47},
    ...     "final_raw": {"step": 50, "variant": "raw", "confirmation_score": 0.49},
    ...     "best_candidate": {"step": 45, "variant": "avg", "confirmation_score": 0.516},
    ...     "intervals": {"score": {**interval, "estimate": 0.512, "low": 0.48, "high": 0.54},
    ...                   "avg_minus_raw": interval, "ens_minus_raw": None}, "unavailable": []}
    >>> print("\\n".join(evidence_lines(evidence)))
      mean score on the confirmation half (holdout=0.5: examples selection never read):
        chosen       step 40 avg  0.512  95% CI [0.480, 0.540]
        naive pick   step 25 raw  0.470  (the raw checkpoint with the best selection score)
        final raw    step 50 raw  0.490
        regret       0.004  (best candidate: step 45 avg 0.516)
        avg - raw at step 40: +0.020, 95% CI [-0.010, +0.050]: not distinguishable from raw
    """
    metric = evidence.get("metric") or "mean"
    if evidence.get("holdout") is not None:
        where = f"on the confirmation half (holdout={evidence['holdout']:g}: examples selection never read)"
    else:
        where = (
            "on all examples (no holdout: the examples selection read, so biased upward; "
            "holdout=0.5 holds half out)"
        )
    lines = [f"  {metric} score {where}:"]
    intervals = evidence.get("intervals") or {}
    rows = (("chosen", "chosen"), ("naive", "naive pick"), ("final_raw", "final raw"))
    for key, label in rows:
        entry = evidence.get(key)
        if not entry or entry.get("confirmation_score") is None:
            continue
        line = f"    {label:<12} step {entry['step']} {entry['variant']:<4} {entry['confirmation_score']:.3f}"
        if key == "chosen" and intervals.get("score"):
            line += f"  {_interval_text(intervals['score'])}"
        if key == "naive":
            line += "  (the raw checkpoint with the best selection score)"
        lines.append(line)
    top = evidence.get("best_candidate")
    if evidence.get("regret") is not None and top:
        lines.append(
            f"    {'regret':<12} {evidence['regret']:.3f}  (best candidate: step {top['step']} "
            f"{top['variant']} {top['confirmation_score']:.3f})"
        )
    chosen = evidence.get("chosen") or {}
    for key, variant in (("avg_minus_raw", "avg"), ("ens_minus_raw", "ens")):
        interval = intervals.get(key)
        if interval:
            lines.append(
                f"    {variant} - raw at step {chosen.get('step')}: {interval['estimate']:+.3f}, "
                f"{_interval_text(interval, signed=True)}: {_verdict(interval)}"
            )
    unavailable = evidence.get("unavailable") or []
    if unavailable:
        lines.append(
            f"    unavailable for task(s) {', '.join(unavailable)}: their examples could not be split"
        )
    return lines if len(lines) > 1 else []


def _interval_text(interval: dict, *, signed: bool = False) -> str:
    form = "+.3f" if signed else ".3f"
    level = round(100 * float(interval.get("confidence", 0.95)))
    return f"{level}% CI [{interval['low']:{form}}, {interval['high']:{form}}]"


def _verdict(interval: dict) -> str:
    if interval["low"] > 0:
        return "significantly better than raw"
    if interval["high"] < 0:
        return "significantly worse than raw"
    return "not distinguishable from raw"
