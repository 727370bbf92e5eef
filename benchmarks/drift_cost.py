"""Item 9: what the weight drift costs per snapshot, and what a bootstrap interval costs.

* Two ``SnapshotWindow`` s, drift on and drift off, receive the same GPT-2-124M-shaped state dict
  (float32 random tensors, ``lm_head`` tied to ``wte``; no model built) at every snapshot, alternately
  and in alternating order, window 3 (so every update evicts). Measured per snapshot: the listener on
  the writer thread (average update, plus the drift when on), the whole background work (``push``
  returning to ``wait`` returning: write, fsync, hash, listener, manifest), and the training thread's
  blocked time in ``push``, which the drift must leave as it is.
* ``WindowAverage.drift_sums`` (float32 blocks of 32K elements, float64 totals) against the same
  sums with every block widened to float64 first, as ``diagnostics.DriftAccumulator`` does.
* ``bootstrap_interval`` and ``paired_difference`` at 1,000 resamples for 500, 2,048 and 20,000
  examples, and the stratified mean over 4 tasks of 2,048 examples when ``bootstrap`` has it.

Standalone: ``python -m benchmarks.drift_cost [--quick]`` prints the figures and the item's section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os

# As in run.py: OpenMP threads that spin while they wait fought the other jobs on these 2-core machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Figure, interleaved_samples, ratio_spread
from checkpoint_stability import bootstrap
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import LazySnapshot
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.window import SnapshotWindow

ITEM = "9"


def gpt2_shaped_state(
    width: int, layers: int, vocabulary: int, context: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A state dict shaped like ``GPT2LMHeadModel``'s (Conv1D weights are input x output), random float32,
    with ``lm_head.weight`` the very tensor of ``transformer.wte.weight``."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocabulary, width),
        "transformer.wpe.weight": (context, width),
    }
    for layer in range(layers):
        block = f"transformer.h.{layer}."
        shapes.update(
            {
                block + "ln_1.weight": (width,),
                block + "ln_1.bias": (width,),
                block + "attn.c_attn.weight": (width, 3 * width),
                block + "attn.c_attn.bias": (3 * width,),
                block + "attn.c_proj.weight": (width, width),
                block + "attn.c_proj.bias": (width,),
                block + "ln_2.weight": (width,),
                block + "ln_2.bias": (width,),
                block + "mlp.c_fc.weight": (width, 4 * width),
                block + "mlp.c_fc.bias": (4 * width,),
                block + "mlp.c_proj.weight": (4 * width, width),
                block + "mlp.c_proj.bias": (width,),
            }
        )
    shapes.update({"transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,)})
    generator = torch.Generator().manual_seed(seed)
    state = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


class TimedWindow(SnapshotWindow):
    """A SnapshotWindow that records how long its listener took (the drift, when on, is measured inside
    it: in the pass that subtracts the evicted file once the window is full)."""

    def __init__(self, config: StabilityConfig):
        super().__init__(config, FaultPolicy("raise", Runtime))
        self.listener_seconds: list[float] = []

    def admit(self, added, evicted, window) -> None:
        start = time.perf_counter()
        super().admit(added, evicted, window)
        self.listener_seconds.append(time.perf_counter() - start)


def snapshots(state: dict[str, torch.Tensor], workdir: Path, warmup: int, rounds: int) -> dict[str, dict]:
    """Push ``state`` into a drift-on and a drift-off window, alternately; per side, the samples of the
    measured rounds."""
    windows = {
        "on": TimedWindow(StabilityConfig(window=3, drift=True)),
        "off": TimedWindow(StabilityConfig(window=3, drift=False)),
    }
    for name, window in windows.items():
        window.open(workdir / f"drift-{name}")
    samples: dict[str, dict[str, list[float]]] = {name: {"blocked": [], "background": []} for name in windows}
    try:
        for round_ in range(warmup + rounds):
            with torch.no_grad():
                for tensor in state.values():
                    tensor.add_(
                        1e-3
                    )  # a stand-in for an optimizer step (the tied tensor moves once per name)
            order = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
            for name in order:
                window = windows[name]
                start = time.perf_counter()
                window.push(round_ + 1, state)
                pushed = time.perf_counter()
                window.wait()
                done = time.perf_counter()
                if round_ >= warmup:
                    samples[name]["blocked"].append(pushed - start)
                    samples[name]["background"].append(done - pushed)
        for name, window in windows.items():
            samples[name]["listener"] = window.listener_seconds[warmup:]
        assert windows["on"].drift_of(warmup + rounds) is not None
        assert windows["off"].drift_of(warmup + rounds) is None
    finally:
        for window in windows.values():
            window.release()
    return samples


def float64_drift_sums(
    average: WindowAverage, current: dict[str, torch.Tensor], previous: LazySnapshot, block: int = 1 << 20
) -> tuple[float, float, float]:
    """The reference: the same three sums with every block widened to float64 first (as
    ``DriftAccumulator`` does), the previous snapshot read by the same row slices."""
    count = average.count
    current_sq = previous_sq = average_sq = 0.0
    for name, total in average._sum.items():  # the running sums themselves: this is a benchmark
        flat, flat_total = current[name].reshape(-1), total.view(-1)
        rows = previous.read_rows(name, 0, total.shape[0]) if total.dim() else previous[name].reshape(-1)
        for start in range(0, flat.numel(), block):
            wide = flat[start : start + block].to(torch.float64)
            current_sq += float(torch.dot(wide, wide))
            difference = wide - rows[start : start + block].to(torch.float64)
            previous_sq += float(torch.dot(difference, difference))
            difference = flat_total[start : start + block].to(torch.float64) / count - wide
            average_sq += float(torch.dot(difference, difference))
    return current_sq, previous_sq, average_sq


def kernel_figure(state: dict[str, torch.Tensor], workdir: Path, size: str, repeats: int) -> Figure:
    window = TimedWindow(StabilityConfig(window=3))
    window.open(workdir / "kernel")
    try:
        for step in (1, 2):
            with torch.no_grad():
                state["transformer.wpe.weight"].add_(1e-3)
            window.push(step, state)
            window.wait()
        previous = window.files.open_lazy(1)
        current = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
        ours = window.average.drift_sums(current, previous)
        reference = float64_drift_sums(window.average, current, previous)
        worst = max(abs(a - b) / b for a, b in zip(ours, reference, strict=True) if b)
        samples = interleaved_samples(
            {
                "float32 blocks": lambda: window.average.drift_sums(current, previous),
                "float64 blocks": lambda: float64_drift_sums(window.average, current, previous),
            },
            repeats=repeats,
        )
    finally:
        window.release()
    ours_time = statistics.median(samples["float32 blocks"])
    reference_time = statistics.median(samples["float64 blocks"])
    return Figure(
        ITEM,
        f"drift_sums / the same sums widened to float64 block by block ({size})",
        ours_time / reference_time,
        note=(
            f"{ours_time * 1e3:.0f} vs {reference_time * 1e3:.0f} ms, medians of {repeats}; "
            f"{ratio_spread(samples['float32 blocks'], samples['float64 blocks'])}; "
            f"largest relative difference of the sums {worst:.1e}"
        ),
    )


def bootstrap_figures(sizes: list[int], groups: int, group_size: int, repeats: int) -> list[Figure]:
    """Seconds per interval at 1,000 resamples, per-example scores given as Python lists (as tasks give
    them), validation included."""
    rng = random.Random(0)
    candidates = {}
    for n in sizes:
        a = [float(rng.random() < 0.6) for _ in range(n)]
        b = [float(rng.random() < 0.55) for _ in range(n)]
        candidates[f"bootstrap_interval, n = {n:,}"] = lambda a=a: bootstrap.bootstrap_interval(a)
        candidates[f"paired_difference, n = {n:,}"] = lambda a=a, b=b: bootstrap.paired_difference(a, b)
    stratified, paired_stratified = bootstrap.stratified_interval, bootstrap.paired_stratified_difference
    tasks_a = [[float(rng.random() < 0.6) for _ in range(group_size)] for _ in range(groups)]
    tasks_b = [[float(rng.random() < 0.55) for _ in range(group_size)] for _ in range(groups)]
    shape = f"{groups} tasks x {group_size:,}"
    candidates[f"stratified_interval, {shape}"] = lambda: stratified(tasks_a)
    candidates[f"paired_stratified_difference, {shape}"] = lambda: paired_stratified(tasks_a, tasks_b)
    samples = interleaved_samples(candidates, repeats=repeats)
    figures = []
    for name, values in samples.items():
        median = statistics.median(values)
        figures.append(
            Figure(
                ITEM,
                f"{name}, 1,000 resamples",
                median * 1e3,
                unit="ms",
                note=f"median of {repeats}; rounds: {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms",
            )
        )
    return figures


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    # Three warm-up snapshots fill the window, so every measured one evicts the oldest.
    warmup = 3
    if quick:
        size, shape = "1M", dict(width=128, layers=4, vocabulary=1024, context=128)
        rounds, repeats, bootstrap_sizes, group_size = 3, 3, [500, 2048], 512
    else:
        size, shape = "124M", dict(width=768, layers=12, vocabulary=50257, context=1024)
        rounds, repeats, bootstrap_sizes, group_size = 7, 5, [500, 2048, 20000], 2048
    state = gpt2_shaped_state(**shape)
    parameters = sum(t.numel() for n, t in state.items() if n != "lm_head.weight")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        samples = snapshots(state, Path(directory), warmup, rounds)
        on, off = samples["on"], samples["off"]
        listener_on, listener_off = statistics.median(on["listener"]), statistics.median(off["listener"])
        # The drift is measured inside the listener (fused into the pass over the evicted file): its cost
        # is what the listener takes more with it than without, round by round.
        extra = [a - b for a, b in zip(on["listener"], off["listener"], strict=True)]
        drift = statistics.median(extra)
        background_on, background_off = (
            statistics.median(on["background"]),
            statistics.median(off["background"]),
        )
        blocked_on, blocked_off = statistics.median(on["blocked"]), statistics.median(off["blocked"])
        figures += [
            Figure(
                ITEM,
                f"writer-thread listener per snapshot, drift on / off ({size}, float32, window 3)",
                listener_on / listener_off,
                note=(
                    f"average update + drift {listener_on * 1e3:.0f} ms vs average update "
                    f"{listener_off * 1e3:.0f} ms, medians of {rounds}; "
                    f"{ratio_spread(on['listener'], off['listener'])}"
                ),
            ),
            Figure(
                ITEM,
                f"drift measurement per snapshot / whole background work without it ({size})",
                drift / background_off,
                note=(
                    f"{drift * 1e3:.0f} ms, the listener's time with the drift minus without, round by round "
                    f"({min(extra) * 1e3:.0f} to {max(extra) * 1e3:.0f}), vs {background_off * 1e3:.0f} ms "
                    "of write, fsync, hash, average and manifest"
                ),
            ),
            Figure(
                ITEM,
                f"background work per snapshot (push to wait), drift on / off ({size})",
                background_on / background_off,
                note=(
                    f"{background_on * 1e3:.0f} vs {background_off * 1e3:.0f} ms; "
                    f"{ratio_spread(on['background'], off['background'])}; "
                    "the fsync's time varies with the disk"
                ),
            ),
            Figure(
                ITEM,
                f"push blocked time, drift on / off ({size})",
                blocked_on / blocked_off,
                note=(
                    f"{blocked_on * 1e3:.1f} vs {blocked_off * 1e3:.1f} ms; "
                    f"{ratio_spread(on['blocked'], off['blocked'])}; the push does the same work either way"
                ),
            ),
        ]
        figures.append(kernel_figure(state, Path(directory), size, repeats))
    figures += bootstrap_figures(bootstrap_sizes, 4, group_size, repeats)
    return figures, {size: parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small state dict: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as workdir:
        figures, _ = run(args.quick, Path(workdir))
    elapsed = time.perf_counter() - clock
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from benchmarks.run import table

    print(table(figures))
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {elapsed:.0f} s, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, load average {load_start} at the start, "
        f"{load_end} at the end"
    )


if __name__ == "__main__":
    main()
