"""The report's figures: score curves, per-example flip heatmaps, the ensemble window-size sweep and the
weight drift.

Every figure is a ``matplotlib.figure.Figure`` drawn by ``FigureCanvasAgg`` and saved as PNG, so nothing
here touches pyplot's global state or the user's interactive backend. matplotlib is imported inside the
functions: it is an optional extra (``pip install checkpoint-stability[report]``), and this module must
import without it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from checkpoint_stability.storage.confinement import open_confined

RAW_COLOR = "#555555"
VARIANT_COLORS = {"avg": "#1f77b4", "ens": "#e6550d"}
# Several windows of one variant: light (small window) to dark (large window) in the variant's hue.
VARIANT_COLORMAPS = {"avg": "Blues", "ens": "Oranges"}
VARIANT_NAMES = {
    "raw": "raw (live model)",
    "avg": "avg (weight average)",
    "ens": "ens (output vote)",
}
WRONG_COLOR, RIGHT_COLOR = "#f7f7f7", "#2c7fb8"
BEST_COLOR = "#222222"
# Weight drift: a jump and the windows that span one, in a red none of the variants uses.
JUMP_COLOR, SPAN_COLOR = "#b2182b", "#fde0dd"
LOG_SPREAD = 10.0
"""The drift plot's y axis is logarithmic when its positive values spread over more than this factor."""
# Tasks in the window sweep: hues (and markers) that none of the variants above uses, so a task's line is
# never read as raw (grey), avg (blue) or ens (orange) of the score plots.
TASK_COLORS = ("#7b3294", "#1b9e77", "#c51b7d", "#8c6d31", "#d6a000", "#4d4d9f", "#b2182b", "#5aae61")
TASK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
DPI = 130

_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9.5,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass
class Curve:
    """One (variant, window) score series of a task, with its MTV over the final evaluations."""

    variant: str
    window: int
    steps: list[int]
    scores: list[float]
    mtv: float | None = None


@dataclass
class BestMarker:
    """Where the selected best model sits on a task's score plot: a vertical line at ``step``, and a
    marker at ``score`` (the chosen variant's value there; None when that curve has no value at
    ``step``)."""

    step: int
    variant: str
    window: int
    score: float | None
    label: str


def best_marker(best: dict | None, curves: Sequence[Curve]) -> BestMarker | None:
    """The best model's marker on one task's curves, or None when no curve holds its step.

    ``best`` is ``best.json`` as :func:`~checkpoint_stability.selection.read_best` returns it. The marker
    goes on the curve of the chosen variant and window (raw has window 1; when the window is not
    recorded, the variant's only curve that holds the step).

    >>> curves = [Curve("raw", 1, [10, 20], [0.5, 0.6]), Curve("avg", 3, [10, 20], [0.55, 0.7])]
    >>> best_marker({"step": 20, "variant": "avg", "window": 3}, curves)
    BestMarker(step=20, variant='avg', window=3, score=0.7, label='best: step 20 (avg)')
    >>> best_marker({"step": 30, "variant": "avg", "window": 3}, curves) is None
    True
    """
    if best is None:
        return None
    step, variant = best["step"], best["variant"]
    if not any(step in curve.steps for curve in curves):
        return None
    window = 1 if variant == "raw" else best.get("window")
    holding = [c for c in curves if c.variant == variant and step in c.steps]
    chosen = next((c for c in holding if c.window == window), None)
    if chosen is None and window is None and len(holding) == 1:
        chosen = holding[0]
    score = chosen.scores[chosen.steps.index(step)] if chosen is not None else None
    return BestMarker(
        step=step,
        variant=variant,
        window=chosen.window if chosen is not None else (window or 0),
        score=score,
        label=f"best: step {step} ({variant})",
    )


@dataclass
class FlipPanel:
    """Per-example scores of one variant over its last evaluations: ``values[row][column]``."""

    title: str
    steps: list[int]
    values: list[list[float]]


@contextlib.contextmanager
def _figure(width: float, height: float) -> Iterator:
    """A Figure attached to an Agg canvas, under the report's style (restored afterwards)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):  # type: ignore[arg-type]  # a plain dict of rc names
        figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        yield figure


def _save(figure, path: Path) -> None:
    """Write the PNG to ``path``, a new file: created here, never reached through a link (a name that
    exists already, a link included, is refused rather than written through)."""
    path = Path(path)
    fd = open_confined(path.parent, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with open(fd, "wb") as f:
        # "tight" grows the canvas to hold legends placed below their panels, which the layout engine ignores.
        figure.savefig(f, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)


def _label(curve: Curve, with_variant: bool = True) -> str:
    if curve.variant == "raw":
        text = VARIANT_NAMES["raw"]
    elif with_variant:
        text = f"{VARIANT_NAMES.get(curve.variant, curve.variant)}, window {curve.window}"
    else:
        text = f"window {curve.window}"
    return text if curve.mtv is None else f"{text} — MTV {curve.mtv:.3f}"


def _plot_curve(axes, curve: Curve, color: str, *, raw: bool = False, label: str) -> None:
    if raw:
        # The live model is the noisy reference: thin, grey, drawn under the steadier variants.
        axes.plot(curve.steps, curve.scores, color=color, lw=1.1, alpha=0.8, marker="o", ms=2.5, label=label)
    else:
        axes.plot(curve.steps, curve.scores, color=color, lw=2.0, marker="o", ms=3, label=label, zorder=3)


def _mark_best(axes, best: BestMarker, *, with_marker: bool) -> None:
    """A dashed vertical line at the best step, and a star on the chosen curve (gid ``"best"`` on both, so
    a reader of the figure can find them)."""
    if with_marker and best.score is not None:
        axes.axvline(best.step, color=BEST_COLOR, lw=1.2, ls="--", alpha=0.8, zorder=2, gid="best")
        axes.plot(
            [best.step],
            [best.score],
            ls="none",
            marker="*",
            ms=16,
            mfc=VARIANT_COLORS.get(best.variant, RAW_COLOR),
            mec=BEST_COLOR,
            mew=1.0,
            zorder=5,
            clip_on=False,  # the best is often the last evaluation, on the axes' edge
            gid="best",
            label=f"{best.label}, score {best.score:.3f}",
        )
    else:
        axes.axvline(
            best.step, color=BEST_COLOR, lw=1.2, ls="--", alpha=0.8, zorder=2, gid="best", label=best.label
        )


def _shade_final(axes, final_start: int | None, last_step: int | None, fraction_label: str) -> None:
    if final_start is None or last_step is None:
        return
    axes.axvspan(final_start, last_step, color="#fff3b0", alpha=0.6, lw=0, zorder=0, label=fraction_label)


def plot_scores(
    path: Path,
    *,
    task: str,
    metric: str,
    raw: Curve | None,
    others: Sequence[Curve],
    final_start: int | None,
    final_label: str,
    best: BestMarker | None = None,
):
    """Score over steps for raw and each avg/ens window; the final evaluations that the table's MTV and
    IS are computed over are shaded. Return the figure (already saved; its artists can be inspected).

    One panel when each variant has a single window; otherwise one panel per variant (raw repeated in
    each as the reference), its windows shaded light to dark, so no panel holds more than a handful of
    lines. ``best`` (see :func:`best_marker`): a dashed line at the selected model's step in every panel,
    and a star on the chosen variant's curve in the panel that holds it.
    """
    variants = list(dict.fromkeys(c.variant for c in others))
    several = any(sum(c.variant == v for c in others) > 1 for v in variants)
    groups = [[c for c in others if c.variant == v] for v in variants] if several else [list(others)]
    groups = groups or [[]]
    steps = [s for c in ([raw] if raw else []) + list(others) for s in c.steps]
    last_step = max(steps, default=None)
    width = 9.5 if len(groups) == 1 else 6.2 * len(groups)
    with _figure(width, 4.8) as figure:
        axes_row = figure.subplots(1, len(groups), sharey=True, squeeze=False)[0]
        for axes, group in zip(axes_row, groups, strict=True):
            _shade_final(axes, final_start, last_step, final_label)
            if raw is not None:
                _plot_curve(axes, raw, RAW_COLOR, raw=True, label=_label(raw))
            if several:
                variant = group[0].variant
                colormap = _colormap(VARIANT_COLORMAPS.get(variant, "Greens"))
                for k, curve in enumerate(group):
                    shade = 0.45 + 0.55 * (k / (len(group) - 1)) if len(group) > 1 else None
                    color = VARIANT_COLORS.get(variant, "#2ca02c") if shade is None else colormap(shade)
                    _plot_curve(axes, curve, color, label=_label(curve, with_variant=False))
                axes.set_title(VARIANT_NAMES.get(variant, variant))
            else:
                for curve in group:
                    color = VARIANT_COLORS.get(curve.variant, "#2ca02c")
                    _plot_curve(axes, curve, color, label=_label(curve))
            if best is not None:
                holds = best.variant == "raw" or any(c.variant == best.variant for c in group)
                _mark_best(axes, best, with_marker=holds)
            axes.set_xlabel("optimizer step")
            axes.grid(True, alpha=0.3)
            if several:
                # Below its own panel: each panel has its own windows, and nothing overlaps the curves.
                axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
        if not several:
            figure.legend(*axes_row[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
        axes_row[0].set_ylabel(f"score ({metric})")
        title = "mean over tasks" if task == "mean" else f"task {task!r}"
        figure.suptitle(f"Score at each evaluation — {title}")
        _save(figure, path)
    return figure


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def plot_flips(
    path: Path,
    *,
    task: str,
    panels: Sequence[FlipPanel],
    row_labels: Sequence[str],
    subtitle: str,
) -> None:
    """Heatmaps of per-example scores (rows: examples, columns: the last evaluations), side by side.

    Rows are the same examples in every panel, those that change most often on top, so a row that keeps
    switching colour in the raw panel and stays one colour in the ens/avg panel is an answer the
    integration steadied.
    """
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    rows = len(row_labels)
    height = min(10.0, max(3.6, 0.15 * rows + 2.2))
    width = max(7.0, 3.9 * len(panels) + 1.2)
    colormap = LinearSegmentedColormap.from_list("correctness", [WRONG_COLOR, RIGHT_COLOR])
    with _figure(width, height) as figure:
        axes_row = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for axes, panel in zip(axes_row, panels, strict=True):
            columns = len(panel.steps)
            axes.imshow(
                panel.values,
                aspect="auto",
                interpolation="nearest",
                cmap=colormap,
                vmin=0.0,
                vmax=1.0,
                extent=(-0.5, columns - 0.5, rows - 0.5, -0.5),
            )
            # Thin white lines between cells keep neighbouring examples and evaluations apart.
            axes.set_xticks([c - 0.5 for c in range(1, columns)], minor=True)
            axes.set_yticks([r - 0.5 for r in range(1, rows)], minor=True)
            axes.grid(which="minor", color="white", lw=0.6)
            axes.tick_params(which="minor", length=0)
            for spine in axes.spines.values():
                spine.set_visible(False)
            ticks = _spread(columns, 6)
            axes.set_xticks(ticks, [str(panel.steps[c]) for c in ticks], rotation=45, ha="right")
            axes.set_xlabel("optimizer step")
            axes.set_title(panel.title)
        for axes in axes_row[1:]:
            axes.tick_params(axis="y", length=0)
        first = axes_row[0]
        if rows <= 40:
            first.set_yticks(range(rows), list(row_labels), fontsize=8 if rows > 20 else 9)
            first.set_ylabel("example id")
        else:
            first.set_yticks([])
            first.set_ylabel(f"{rows} examples (most changes on top)")
        handles = [
            Patch(facecolor=RIGHT_COLOR, label="correct (score 1)"),
            Patch(facecolor=WRONG_COLOR, edgecolor="#999999", label="wrong (score 0)"),
        ]
        if any(v not in (0.0, 1.0) for panel in panels for row in panel.values for v in row):
            handles.insert(1, Patch(facecolor=colormap(0.5), label="partial credit (lighter: lower)"))
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        figure.suptitle(f"Which examples flip — task {task!r}\n{subtitle}")
        _save(figure, path)


def _spread(count: int, most: int) -> list[int]:
    """At most ``most`` evenly spread indices of ``range(count)``, always including the last."""
    if count <= most:
        return list(range(count))
    step = -(-(count - 1) // (most - 1))
    ticks = list(range(count - 1, -1, -step))
    return sorted(ticks)


def plot_window_sweep(path: Path, *, sweeps: dict[str, list[dict]], final_label: str):
    """Score, MTV and IS over the final evaluations against the vote ensemble's window size ``n``; one
    line per task, in :data:`TASK_COLORS` (none of them a variant's colour). ``n = 1`` is the live model
    itself. Return the figure (already saved)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    panels = (
        ("score", "score (higher is better)", f"score (mean over the {final_label})"),
        ("mtv", "MTV: how much the score moves", "MTV (lower is steadier)"),
        ("is", "IS: how often answers flip", "IS (lower is steadier)"),
    )
    windows = sorted({row["n"] for rows in sweeps.values() for row in rows})
    with _figure(13.5, 4.4) as figure:
        axes_row = figure.subplots(1, len(panels), squeeze=False)[0]
        for axes, (key, title, ylabel) in zip(axes_row, panels, strict=True):
            for k, (task, rows) in enumerate(sweeps.items()):
                points = [(row["n"], row[key]) for row in rows if row[key] is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    color = TASK_COLORS[k % len(TASK_COLORS)]
                    marker = TASK_MARKERS[k % len(TASK_MARKERS)]
                    # Unclipped: an MTV or IS of 0 sits on the bottom edge.
                    axes.plot(xs, ys, marker=marker, lw=2, ms=5, color=color, label=task, clip_on=False)
            axes.set_xscale("log")
            axes.xaxis.set_major_locator(FixedLocator(windows))
            axes.xaxis.set_minor_locator(NullLocator())
            axes.set_xticklabels([str(n) for n in windows])
            axes.set_xlabel("n: last snapshots whose outputs are voted")
            axes.set_ylabel(ylabel)
            axes.set_title(title)
            axes.grid(True, alpha=0.3)
            if key != "score":
                axes.set_ylim(bottom=0)
        if len(sweeps) > 1:
            handles, labels = axes_row[0].get_legend_handles_labels()
            figure.legend(handles, labels, loc="outside right center", title="task")
        else:
            axes_row[0].legend(title="task")
        figure.suptitle(
            f"Ensemble of the last n snapshots (vote of their outputs; n = 1 is the live model), "
            f"over the {final_label} of evaluations"
        )
        _save(figure, path)
    return figure


def plot_drift(
    path: Path,
    *,
    steps: Sequence[int],
    previous: Sequence[float | None],
    average: Sequence[float | None],
    jumps: Sequence[int],
    spans: Sequence[tuple[int, int]],
    threshold: float | None,
    threshold_label: str = "jump threshold",
):
    """How far the weights move at each snapshot: ``previous`` (from the snapshot before, grey like the
    live model) and ``average`` (from the window's average, blue like avg), jumps ringed in
    :data:`JUMP_COLOR` above the dotted jump threshold, and ``spans`` shaded: (first, last) steps of runs of
    snapshots whose window spans a jump.
    The y axis is logarithmic when the positive values spread over more than a factor of
    :data:`LOG_SPREAD` (warm-up moves dwarf later ones); a drift of 0 (an average of one snapshot) then
    has no point. Return the figure (already saved)."""
    values = [v for v in (*previous, *average) if v is not None and v > 0]
    logarithmic = bool(values) and max(values) > LOG_SPREAD * min(values)
    with _figure(9.5, 4.6) as figure:
        axes = figure.subplots()
        for first, last in spans:
            # A run of one snapshot still gets a visible band: half a snapshot interval either side.
            axes.axvspan(*_band(first, last, steps), color=SPAN_COLOR, alpha=0.7, lw=0, zorder=0)
        if spans:
            # One legend entry for all the shaded runs.
            axes.fill_between([], [], color=SPAN_COLOR, alpha=0.7, lw=0, label="window spans a jump")
        for series, color, label, width in (
            (previous, RAW_COLOR, "previous: ‖θ_t − θ_prev‖ / ‖θ_t‖", 1.4),
            (average, VARIANT_COLORS["avg"], "average: ‖θ_t − θ̄_window‖ / ‖θ_t‖", 2.0),
        ):
            points = [(s, v) for s, v in zip(steps, series, strict=True) if v is not None]
            if logarithmic:
                points = [(s, v) for s, v in points if v > 0]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, color=color, lw=width, marker="o", ms=3, label=label, zorder=3)
        if threshold is not None and (threshold > 0 or not logarithmic):
            axes.axhline(threshold, color=JUMP_COLOR, lw=1.1, ls=":", zorder=2, label=threshold_label)
        jumped = [(s, v) for s, v in zip(steps, previous, strict=True) if s in set(jumps) and v is not None]
        if jumped:
            xs, ys = zip(*jumped, strict=True)
            axes.plot(
                xs,
                ys,
                ls="none",
                marker="o",
                ms=10,
                mfc="none",
                mec=JUMP_COLOR,
                mew=1.8,
                zorder=4,
                label="jump",
            )
        if logarithmic:
            from matplotlib.ticker import FuncFormatter

            axes.set_yscale("log")
            # Plain numbers (0.02, 0.3) read faster than 2 × 10⁻² beside the report's drift values; of the
            # minor ticks only 2, 3 and 5 times a power of ten are labelled, so the labels never overlap.
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.yaxis.set_minor_formatter(FuncFormatter(_sparse_log_label))
        axes.margins(y=0.08)  # the ring around a jump at the top of the range stays inside the axes
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("relative drift" + (" (log scale)" if logarithmic else ""))
        axes.grid(True, alpha=0.3)
        figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=3)
        figure.suptitle("How far the weights move at each snapshot")
        _save(figure, path)
    return figure


def _band(first: int, last: int, steps: Sequence[int]) -> tuple[float, float]:
    """The x range shading snapshots ``first`` to ``last``: out to halfway towards their neighbours."""
    i, j = steps.index(first), steps.index(last)
    before = (
        (steps[i] - steps[i - 1]) / 2
        if i > 0
        else (steps[i + 1] - steps[i]) / 2
        if i + 1 < len(steps)
        else 0.5
    )
    after = (steps[j + 1] - steps[j]) / 2 if j + 1 < len(steps) else before
    return first - before, last + after


def _sparse_log_label(value: float, _position) -> str:
    """A minor tick's label on a log axis: ``0.02``, ``0.3``, ``50`` (2, 3 or 5 × a power of ten), or none."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2, 3, 5) else ""
