"""Item 5: the evaluations' own pause, the price users pay per snapshot, at the demo's settings.

The demo's model, batch (16 x 128), optimizer and tasks, trained in a plain loop with a
``StabilityMonitor`` (window 5, every 20 steps, horizon 10, best-average export on): the time each
snapshot takes (raw and avg evaluations, ensemble, metrics, history, TensorBoard, export) over the
training time of the 20 steps before it. Users choose ``every_n_steps`` from this.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.demo_setup import demo_batches, demo_optimizer, demo_setup
from benchmarks.harness import Figure
from checkpoint_stability import StabilityMonitor


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    model, tasks, train_ids, demo = demo_setup()
    every, snapshots = (5, 2) if quick else (20, 5)
    optimizer = demo_optimizer(model, demo)
    batches = demo_batches(train_ids, demo)
    training, pauses = [], []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        monitor = StabilityMonitor(
            tasks, window=5, every_n_steps=every, horizon=demo.HORIZON, console=False, report=False
        )
        monitor.open(Path(directory) / "run")
        model.train()
        elapsed = 0.0
        for step in range(1, every * (snapshots + 1) + 1):
            ids = next(batches)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed += time.perf_counter() - start
            if monitor.should_snapshot(step):
                start = time.perf_counter()
                monitor.step(model, step)
                pause = time.perf_counter() - start
                if step > every:  # the first snapshot also opens sinks and writes task metadata
                    training.append(elapsed)
                    pauses.append(pause)
                elapsed = 0.0
        monitor.close()
    pause, train = statistics.median(pauses), statistics.median(training)
    figure = Figure(
        "5",
        f"evaluation pause per snapshot / training time between snapshots (demo: every {every}, window 5)",
        pause / train,
        note=(
            f"{pause:.2f} s per snapshot vs {train:.2f} s for {every} steps "
            f"({train / every * 1e3:.0f} ms/step); median of {len(pauses)} snapshots"
        ),
    )
    return [figure], {"demo": sum(p.numel() for p in model.parameters())}
