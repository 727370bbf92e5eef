"""Item 7: the peak resident memory the callback adds, in a fresh process so no other peak mixes in.

The child builds the model, then resets the kernel's high-water mark (``/proc/self/clear_refs``) and
runs a ``tasks=[]`` monitor (buffer and average only; window 3, so evictions and exact re-sums happen)
over a few snapshots. What it needs by design: the snapshot's file image (one copy, kept and reused),
the float32 accumulator, and one copy in flight; the figure is the measured peak over that.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks.harness import (
    Figure,
    gpt2,
    parameter_count,
    peak_rss_bytes,
    perturb,
    reset_peak_rss,
    rss_bytes,
    run_child,
    state_bytes,
)


def child(size: str, snapshots: int) -> None:
    from checkpoint_stability import StabilityMonitor
    from checkpoint_stability.state_dicts import live_tensors

    model = gpt2(size)
    perturb(model)
    state = state_bytes(live_tensors(model))
    with tempfile.TemporaryDirectory() as directory:
        monitor = StabilityMonitor(
            [], window=3, every_n_steps=1, console=False, tensorboard=False, report=False, select=None
        )
        before = rss_bytes()
        reset_peak_rss()
        monitor.open(Path(directory) / "run")
        for step in range(1, snapshots + 1):
            perturb(model)
            monitor.on_snapshot(model, step)
        monitor.buffer.wait()
        peak = peak_rss_bytes() - before
        monitor.close()
    print(f"{peak} {state}")


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    size, snapshots = ("1M", 5) if quick else ("124M", 7)
    peak, state = (int(x) for x in run_child("memory", size, str(snapshots)).split())
    budget = 3 * state  # model-sized copy + accumulator (float32) + one in-flight copy
    ratio = peak / budget
    figure = Figure(
        "7",
        f"peak memory added by the callback / (model + accumulator + in-flight copy) ({size})",
        ratio,
        target="<= 1.2",
        met=ratio <= 1.2,
        note=(
            f"{peak / 2**20:.0f} MB added, state {state / 2**20:.0f} MB (float32); "
            f"= {peak / state:.2f} x the state, window 3, {snapshots} snapshots"
        ),
    )
    return [figure], {size: parameter_count(gpt2(size)) if quick else 124_439_808}


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
