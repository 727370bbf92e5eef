"""Item 4: what evaluating the window average costs beyond the evaluation itself.

The monitor swaps the averaged weights into the live model (``WindowAverage.copy_into``) and, after the
evaluation, restores the live weights bit for bit from the snapshot copy (``state.write_into``). That
pair is timed against the floor of one state-dict ``clone()``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Figure, bare_clone, distinct_tensors, gpt2, interleaved, perturb
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.state_dicts import capture_state, live_tensors, write_into


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    size = "1M" if quick else "124M"
    model = gpt2(size)
    live = live_tensors(model)
    average = WindowAverage()
    for _ in range(2):
        perturb(model)
        average.update(capture_state(live))
    backup = capture_state(live)  # the monitor reuses the snapshot it has just taken as the backup
    floor_state = distinct_tensors(live)

    def swap_and_restore():
        average.copy_into(live)
        write_into(live, backup)

    times = interleaved({"swap": swap_and_restore, "clone": lambda: bare_clone(floor_state)}, repeats=5)
    ratio = times["swap"] / times["clone"]
    figure = Figure(
        "4",
        f"avg evaluation overhead (swap in + restore) / state-dict clone ({size})",
        ratio,
        target="<= 2",
        met=ratio <= 2,
        note=f"{times['swap'] * 1e3:.0f} vs {times['clone'] * 1e3:.0f} ms",
    )
    return [figure], {size: sum(p.numel() for p in model.parameters())}
