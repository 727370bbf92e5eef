"""Item 2: the window average per snapshot, against a small window, torch's AveragedModel and the naive way.

* ``WindowAverage.update`` (add the new snapshot, subtract the evicted one read back from disk, exact
  re-sum every ``window`` updates) at window 32 over window 2: O(P), so the ratio should stay near 1.
  Both buffers receive the same snapshots, pushed alternately.
* Over ``torch.optim.swa_utils.AveragedModel.update_parameters`` on the same model: the in-memory,
  windowless running mean, the cheapest thing an average can cost.
* The naive window average users run today: load all N snapshot files and sum them, as fairseq's
  ``scripts/average_checkpoints.py`` does, at N = 20; and the peak memory of each, in fresh processes.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.harness import (
    Figure,
    gpt2,
    interleaved,
    peak_rss_bytes,
    perturb,
    reset_peak_rss,
    rss_bytes,
    run_child,
)
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import LazySnapshot, SnapshotBuffer
from checkpoint_stability.state_dicts import CapturedState, live_tensors


class TimedAverage(WindowAverage):
    """A WindowAverage that records how long each update took, once ``recording`` is set."""

    def __init__(self, window: int):
        super().__init__(torch.float32, exact_sum_every=window)
        self.recording = False
        self.durations: list[float] = []

    def update(self, added, evicted=(), window=None):
        start = time.perf_counter()
        super().update(added, evicted, window)
        if self.recording:
            self.durations.append(time.perf_counter() - start)


def naive_average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """fairseq's average_checkpoints: load each checkpoint whole, add it to a float sum, divide by N."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_file(str(path))
        for name, tensor in state.items():
            value = tensor.float() if tensor.is_floating_point() else tensor
            if name not in total:
                total[name] = value.clone()
            elif value.is_floating_point():
                total[name] += value
        del state
    return {name: t / len(paths) if t.is_floating_point() else t for name, t in total.items()}


def incremental_update(paths: list[Path]) -> None:
    """A steady-state update of the average over ``paths[:-1]``: add ``paths[-1]``, drop the oldest."""
    window = [LazySnapshot(path, {}) for path in paths[:-1]]
    average = WindowAverage(torch.float32, exact_sum_every=len(window))
    average.reset(window)
    added = CapturedState(load_file(str(paths[-1])))
    average.update(added, evicted=[lambda: window[0]], window=lambda: [*window[1:], added])


def measure_peak(mode: str, paths: list[str]) -> None:
    """Child process: the peak resident memory a mode adds over the process as it was before it."""
    before = rss_bytes()
    reset_peak_rss()
    files = [Path(p) for p in paths]
    if mode == "naive":
        naive_average(files)
    else:
        incremental_update(files)
    print(f"{(peak_rss_bytes() - before) / 2**20:.1f}")


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    size, small, large, naive_n = ("1M", 2, 8, 6) if quick else ("50M", 2, 32, 20)
    storage = torch.bfloat16
    model = gpt2(size)
    live = live_tensors(model)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        directory = Path(directory)
        averages = {w: TimedAverage(w) for w in (small, large)}
        buffers = {
            w: SnapshotBuffer(directory / f"w{w}", w, storage_dtype=storage, listener=averages[w].update)
            for w in (small, large)
        }
        measured = large
        for step in range(1, large + measured + 1):
            if step == large + 1:
                for average in averages.values():
                    average.recording = True
            perturb(model)
            for window, buffer in buffers.items():
                if step > large - window:  # each window starts full when the measured updates begin
                    buffer.push(step, live)
                    buffer.wait()  # one write at a time, so the two windows never share the cores
        for buffer in buffers.values():
            buffer.close()
        per_update = {w: statistics.mean(a.durations) for w, a in averages.items()}
        slowest = {w: max(a.durations) for w, a in averages.items()}
        ratio = per_update[large] / per_update[small]
        figures.append(
            Figure(
                "2",
                f"average update per snapshot, window {large} / window {small} ({size}, bf16 storage)",
                ratio,
                target="<= 1.3",
                met=ratio <= 1.3,
                note=(
                    f"mean over {measured} updates, the rolling exact re-sum included: "
                    f"{per_update[large] * 1e3:.0f} vs {per_update[small] * 1e3:.0f} ms"
                ),
            )
        )
        figures.append(
            Figure(
                "2",
                f"slowest update / mean update, window {large} ({size})",
                slowest[large] / per_update[large],
                note=(
                    f"{slowest[large] * 1e3:.0f} vs {per_update[large] * 1e3:.0f} ms; "
                    "no update pays for a whole-window re-sum"
                ),
            )
        )

        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model)
        swa_time = interleaved({"swa": lambda: swa.update_parameters(model)}, repeats=5)["swa"]
        figures.append(
            Figure(
                "2",
                f"average update, window {large} / AveragedModel.update_parameters ({size})",
                per_update[large] / swa_time,
                note=f"{per_update[large] * 1e3:.0f} vs {swa_time * 1e3:.0f} ms",
            )
        )

        files = sorted((directory / f"w{large}").glob("step-*.safetensors"))[-naive_n:]
        # The files were just written, so they sit in the page cache: the naive way reads them at memory
        # speed, the case least favourable to the comparison (a model too big for the page cache makes
        # the naive way read N files from disk per snapshot, against our one evicted file).
        naive_runs = [timed_naive(files) for _ in range(3)]
        naive_time = statistics.median(naive_runs)
        speedup = naive_time / per_update[large]
        figures.append(
            Figure(
                "2",
                f"naive average of N={naive_n} files / incremental update ({size})",
                speedup,
                target=">= 5",
                met=speedup >= 5,
                note=(
                    f"{naive_time:.2f} s (median of {', '.join(f'{t:.2f}' for t in naive_runs)} s, "
                    f"files in the page cache) vs {per_update[large] * 1e3:.0f} ms per snapshot"
                ),
            )
        )
        paths = [str(p) for p in files]
        naive_peak = float(run_child("window_average", "naive", *paths))
        ours_peak = float(run_child("window_average", "incremental", *paths))
        state_mb = sum(t.numel() * 2 for t in load_file(paths[-1]).values()) / 2**20
        figures.append(
            Figure(
                "2",
                f"peak memory added, naive average of N={naive_n}",
                naive_peak,
                unit="MB",
                note=f"one stored snapshot is {state_mb:.0f} MB (bf16)",
            )
        )
        figures.append(
            Figure(
                "2",
                f"peak memory added, incremental update (window {naive_n - 1} re-sum + one update)",
                ours_peak,
                unit="MB",
                note="float32 accumulator + the added snapshot + one evicted tensor at a time",
            )
        )
    return figures, {size: sum(p.numel() for p in model.parameters())}


def timed_naive(files: list[Path]) -> float:
    start = time.perf_counter()
    naive_average(files)
    return time.perf_counter() - start


if __name__ == "__main__":
    measure_peak(sys.argv[1], sys.argv[2:])
