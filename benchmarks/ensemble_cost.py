"""Item 3: the ensemble costs no evaluation. Passes per snapshot, and combining cached outputs vs evaluating.

At the demo's settings (cloze 100 items with choice log-probabilities, next_char 500 positions):

* evaluation passes per snapshot (``task.evaluate`` calls and model forward calls) at windows 5 and 20:
  one raw and one avg evaluation, whatever the window; the naive ensemble evaluates all N snapshots;
* the time to combine the window's cached outputs and score them (``ensemble_result``) over one raw
  evaluation of the same tasks, at windows 5 and 20.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.demo_setup import demo_setup
from benchmarks.harness import Figure, perturb
from checkpoint_stability import StabilityMonitor
from checkpoint_stability.ensemble import ensemble_result


def count_passes(model, tasks, window: int, snapshots: int, directory: Path) -> tuple[float, float]:
    """(evaluate calls per task per snapshot, forward calls per snapshot / forwards of one raw pass)."""
    calls = {"evaluate": 0, "forward": 0}
    originals = {}
    for task in tasks:
        originals[task.name] = task.evaluate

        def counted(m, _evaluate=task.evaluate):
            calls["evaluate"] += 1
            return _evaluate(m)

        task.evaluate = counted
    hook = model.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    try:
        model.eval()
        with torch.no_grad():
            for task in tasks:
                task.evaluate(model)
        raw_forwards = calls["forward"]
        calls.update(evaluate=0, forward=0)
        monitor = StabilityMonitor(
            tasks, window=window, every_n_steps=1, console=False, tensorboard=False, report=False, select=None
        )
        monitor.open(directory / f"passes-w{window}")
        for step in range(1, snapshots + 1):
            perturb(model, 1e-4)
            monitor.on_snapshot(model, step)
        monitor.close()
    finally:
        hook.remove()
        for task in tasks:
            del task.evaluate  # the instance attribute; the class's method shows through again
    return calls["evaluate"] / (snapshots * len(tasks)), calls["forward"] / (snapshots * raw_forwards)


def combine_ratio(model, tasks, window: int, repeats: int) -> tuple[float, float, float]:
    """(combine+score time / raw evaluation time, combine seconds, raw seconds), all tasks together."""
    model.eval()
    results = {task.name: [] for task in tasks}
    raw_times = []
    with torch.no_grad():
        for _ in range(window):
            perturb(model, 1e-2)  # outputs that differ between snapshots, so votes are not trivial
            start = time.perf_counter()
            for task in tasks:
                results[task.name].append(task.evaluate(model))
            raw_times.append(time.perf_counter() - start)
    combine_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for task in tasks:
            ensemble_result("vote", task, results[task.name])
        combine_times.append(time.perf_counter() - start)
    combine = sorted(combine_times)[len(combine_times) // 2]
    raw = sorted(raw_times)[len(raw_times) // 2]
    return combine / raw, combine, raw


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    model, tasks, _, _ = demo_setup()
    figures = []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        for window in (5,) if quick else (5, 20):
            # A window of 20 is not filled here (the count per snapshot does not depend on it): 10 snapshots.
            snapshots = 3 if quick else min(window + 2, 10)
            evaluations, forwards = count_passes(model, tasks, window, snapshots, Path(directory))
            figures.append(
                Figure(
                    "3",
                    f"evaluate calls per task per snapshot, window {window}",
                    evaluations,
                    target="2 (raw + avg)",
                    met=evaluations == 2,
                    note=f"naive ensemble: {window} (+1 avg); forward passes = {forwards:.2f} x one raw pass",
                )
            )
    for window in (5,) if quick else (5, 20):
        ratio, combine, raw = combine_ratio(model, tasks, window, repeats=3 if quick else 7)
        figures.append(
            Figure(
                "3",
                f"ensemble combine + score / one raw evaluation, window {window}",
                100 * ratio,
                unit="%",
                target="<= 2%",
                met=ratio <= 0.02,
                note=(
                    f"{combine * 1e3:.1f} ms vs {raw * 1e3:.0f} ms; naive ensemble: {window} evaluations "
                    f"= {window * raw:.2f} s"
                ),
            )
        )
    return figures, {"demo": sum(p.numel() for p in model.parameters())}
