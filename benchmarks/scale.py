"""Issue 19: the per-snapshot path at GPT-2 124M, 355M and 774M, side by side (``make bench-scale``).

    python benchmarks/scale.py              # every size, 5 steady rounds each: 12 minutes on 2 cores
    python benchmarks/scale.py --sizes 124M --rounds 2 --no-write   # a smoke run, under a minute
    python benchmarks/scale.py --no-drift   # the same without the weight drift, a section of its own

The weight drift (on by default) compares each snapshot with the previous one, whose file it reads back:
one read more per snapshot than the floor below counts. ``--no-drift`` measures the path without it, so
that the two sections show what that read costs.

Measured: 11.9 minutes on 2026-12-05 on 2 shared cores (load average 2.4 at the start, up to 5.4; 124M
1.1, 355M 3.5, 774M 7.1 minutes, most of it the window's own background work at 8-23 s per snapshot).

What is measured is the real per-snapshot path, driven only through ``SnapshotWindow``'s public API
(``open``, ``push``, ``wait``, ``close``, ``release``): ``StabilityConfig(window=3)`` with its defaults
(float32 storage and accumulator, drift measured), no tasks, the window average kept by the buffer's
listener on the writer thread. Each size runs in a process of its own (``--child``), so its peak memory
is its own, and its files are deleted before the next size starts. Per size:

a. **Blocked time ÷ distinct clone.** ``window.push(step, state)`` on the calling thread, the previous
   snapshot's background work finished (``wait()``) before timing it, against one ``clone()`` per
   distinct tensor of the same state dict (GPT-2's tied ``lm_head`` once). The first push is left out.
b. **Background work ÷ (durable write + read of the same bytes).** From ``push`` returning to ``wait``
   returning, in steady state: the window is full, so every snapshot evicts one (listener, write, fsync,
   manifest and eviction included). The floor: the same number of bytes (a preallocated buffer the size
   of a snapshot file) written to a new file in the buffer's directory in 32 MiB writes, fsync, rename,
   directory fsync; then the file written ``window`` rounds earlier read back in 32 MiB reads and deleted,
   as the buffer reads and deletes the snapshot it evicts.
c. **End-to-end throughput ÷ durable ``save_file``.** Snapshot-file bytes ÷ background time, against
   ``safetensors.torch.save_file`` of the same tensors + fsync of the file (+ unlink, as
   ``benchmarks/disk.py`` times it), in MiB/s.
d. **Peak added memory ÷ state.** Resident memory sampled by a thread every 5 ms (psutil) and the
   kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), over the first
   ``window + 2`` snapshots (two of them evicting; nothing else allocates meanwhile), minus the resident
   size once the model was built; state = the state dict's distinct bytes. After the timed rounds, with
   the floor's buffer freed: what ``close()`` + ``release()`` of the idle window add to the resident
   size before them, a row of its own.
e. **Seconds per GiB** of background work at each size, and the largest size's over the smallest's:
   linear growth is a ratio near 1.

The first snapshot (allocating the reused file image) is given apart: its blocked and background time.
Every timed side alternates with the others in one process, the order reversed every round, and each
figure gives the round-by-round spread (min / median / max of the per-round ratios) and the load average
at the start and end of its size's run. Nothing is asserted: these are measurements.

1.5B (6.2 GB of float32 state) is run only when memory allows: besides the model, the reused image, the
float32 accumulator, the floor's write buffer and one transient copy (a clone, or ``save_file``'s bytes)
are resident at once, about 5 x the state; on a 24 GiB machine that is 31 GB, so it is reported as not run.
Disk: the window's 3 files, one in flight, the floor's 3 files and one in flight, and a ``save_file``
file, up to 3.1 GB each at 774M (about 28 GB).

Writes (replaces) the section "## Scale (issue 19)" (``--no-drift``: "## Scale (issue 19), weight drift
off") of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os

# As in run.py: OpenMP threads that spin while they wait fought the other jobs on these 2-core machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.harness import (
    MODEL_SIZES,
    REPO,
    Figure,
    bare_clone,
    distinct_tensors,
    gpt2,
    parameter_count,
    peak_rss_bytes,
    perturb,
    reset_peak_rss,
    rss_bytes,
    run_child,
    state_bytes,
)
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.window import SnapshotWindow

WINDOW = 3
CHUNK = 32 * 2**20
"""The floor's write and read size: large enough that the system-call count does not matter."""
SIZES = ("124M", "355M", "774M", "1.5B")
HEADING = "## Scale (issue 19): `make bench-scale`"
HEADING_NO_DRIFT = "## Scale (issue 19), weight drift off: `python benchmarks/scale.py --no-drift`"
# Whether the window measures the weight drift (the default; --no-drift turns it off): the drift's distance
# from the previous snapshot reads that snapshot's file back, one read more than the floor counts.
DRIFT = True
RESIDENT_STATES = 5
"""State-sized allocations resident at once in a size's process: the model, the reused image, the float32
accumulator, the floor's write buffer, and one transient copy (a clone, or ``save_file``'s bytes)."""


# ---------------------------------------------------------------------------------------------- child


class PeakSampler:
    """Resident memory sampled on a thread every ``interval`` seconds; ``mark()`` gives the peak since
    the previous mark and starts a new phase."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._lock = threading.Lock()
        self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._rss()
            with self._lock:
                self._peak = max(self._peak, rss)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> int:
        rss = self._rss()
        with self._lock:
            peak, self._peak = max(self._peak, rss), rss
        return peak


def _high_water_mark_usable() -> bool:
    """Whether the kernel's high-water mark can be reset here (``/proc/self/clear_refs``: Linux >= 4.0, and
    a container may refuse it); the sampled peak is used alone otherwise."""
    try:
        reset_peak_rss()
    except OSError:
        return False
    return True


def open_window(directory: Path) -> SnapshotWindow:
    """The window under test, with the library's defaults, open in ``directory``. Faults raise: a snapshot
    that failed must not pass for a fast one."""
    window = SnapshotWindow(StabilityConfig(window=WINDOW, drift=DRIFT), FaultPolicy("raise", Runtime))
    window.open(directory)
    return window


def snapshot_file_bytes(directory: Path) -> int:
    """The size of the newest snapshot file the window wrote (found on disk: no internals needed)."""
    files = sorted(directory.rglob("step-*.safetensors"))
    if not files:
        raise RuntimeError(f"no snapshot file under {directory}")
    return files[-1].stat().st_size


class DurableFloor:
    """The physical floor of a snapshot's background work: one durable write of its bytes and one read of
    a file of that size written ``window`` rounds earlier (as the evicted snapshot was), then its removal."""

    def __init__(self, directory: Path, size: int, window: int):
        self.directory = directory
        self.window = window
        self.data = bytearray(size)
        # Filled (so its pages are resident and the disk gets real data) from a random block repeated.
        block = os.urandom(min(CHUNK, size))
        view = memoryview(self.data)
        for start in range(0, size, len(block)):
            view[start : start + len(block)] = block[: size - start]
        self._scratch = memoryview(bytearray(CHUNK))

    def _path(self, round_: int) -> Path:
        return self.directory / f"floor-{round_:08d}.bin"

    def write(self, round_: int) -> float:
        start = time.perf_counter()
        temporary = self.directory / f".floor-{round_:08d}.tmp"
        view = memoryview(self.data)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written : written + CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, self._path(round_))
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
        return time.perf_counter() - start

    def read_evicted(self, round_: int) -> float | None:
        """Read back and delete the file of ``round_ - window``; None while there is none yet."""
        path = self._path(round_ - self.window)
        if not path.exists():
            return None
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(self._scratch):
                pass
        path.unlink()
        return time.perf_counter() - start


def durable_save_file(tensors: dict[str, torch.Tensor], path: Path) -> tuple[float, int]:
    """``safetensors.torch.save_file`` + fsync of the file + unlink, timed as ``benchmarks/disk.py`` does;
    seconds and the file's bytes."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    size = path.stat().st_size
    path.unlink()
    return time.perf_counter() - start, size


def snapshot_run(model, state, directory: Path, rounds: int) -> dict:
    """One window's run: the memory phase, then the timed rounds, then ``close()``.

    Memory phase (nothing else allocates): push 1 (allocating the reused image; its blocked and
    background time are kept apart), pushes 2..window filling the window, pushes window + 1 and window + 2
    evicting (and warming the window's side up); the peak resident memory of these, over the resident
    size once the model was built. Then the floor's buffer is allocated and its first ``window`` files
    written, the clone and ``save_file`` run once to warm up, and ``rounds`` rounds alternate the window's
    snapshot, the distinct clone, the durable floor and a durable ``save_file``, in an order reversed
    every round. Last, with the floor's buffer freed: ``close()`` and ``release()`` on the idle window,
    and what they add to the resident size before them.
    """
    distinct = distinct_tensors(state)
    base = rss_bytes()
    hwm = _high_water_mark_usable()
    samples: dict[str, list[float]] = {
        name: [] for name in ("blocked", "background", "clone", "write", "read", "save_file")
    }
    memory: dict = {"base": base, "hwm_usable": hwm, "snapshots": WINDOW + 2}
    window = open_window(directory)
    try:
        with PeakSampler() as sampler:
            if hwm:
                reset_peak_rss()
            sampler.mark()
            for step in range(1, WINDOW + 3):
                perturb(model)
                start = time.perf_counter()
                window.push(step, state)
                pushed = time.perf_counter()
                window.wait()
                if step == 1:
                    memory["first"] = {"blocked": pushed - start, "background": time.perf_counter() - pushed}
            memory["snapshots_sampled"] = sampler.mark()
            memory["snapshots_hwm"] = peak_rss_bytes() if hwm else 0
            memory["snapshots_peak"] = max(memory["snapshots_sampled"], memory["snapshots_hwm"])

            file_bytes = snapshot_file_bytes(directory)
            floor = DurableFloor(directory, file_bytes, WINDOW)
            first_measured = WINDOW + 3
            for earlier in range(first_measured - WINDOW, first_measured):
                floor.write(earlier)
            bare_clone(distinct)
            saved_bytes = durable_save_file(distinct, directory / "save_file.safetensors")[1]
            for step in range(first_measured, first_measured + rounds):
                perturb(model)
                sides = ["window", "floor", "clone", "save_file"]
                if step % 2:
                    sides.reverse()
                for side in sides:
                    gc.collect()
                    if side == "window":
                        start = time.perf_counter()
                        window.push(step, state)
                        pushed = time.perf_counter()
                        window.wait()
                        samples["blocked"].append(pushed - start)
                        samples["background"].append(time.perf_counter() - pushed)
                    elif side == "floor":
                        samples["write"].append(floor.write(step))
                        read = floor.read_evicted(step)
                        if read is None:
                            raise RuntimeError(f"the floor's file of round {step - WINDOW} is missing")
                        samples["read"].append(read)
                    elif side == "clone":
                        start = time.perf_counter()
                        copy = bare_clone(distinct)
                        samples["clone"].append(time.perf_counter() - start)
                        del copy
                    else:
                        elapsed, saved_bytes = durable_save_file(
                            distinct, directory / "save_file.safetensors"
                        )
                        samples["save_file"].append(elapsed)
            steps = window.steps

            del floor
            gc.collect()
            memory["before_close"] = rss_bytes()
            if hwm:
                reset_peak_rss()
            sampler.mark()
            window.close()
            window.release()
            memory["close_peak"] = max(sampler.mark(), peak_rss_bytes() if hwm else 0)
    finally:
        window.release()
    return {
        "samples": samples,
        "memory": memory,
        "file_bytes": file_bytes,
        "save_file_bytes": saved_bytes,
        "steps": steps,
    }


def child(size: str, rounds: int, workdir: Path) -> None:
    """One size, in a process of its own: prints its measurements as one JSON line."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_start = os.getloadavg()
    clock = time.perf_counter()
    model = gpt2(size)
    state = model.state_dict()
    gc.collect()
    with tempfile.TemporaryDirectory(prefix=f"scale-{size}-", dir=workdir) as directory:
        measured = snapshot_run(model, state, Path(directory), rounds)
    result = {
        "size": size,
        "parameters": parameter_count(model),
        "state_bytes": state_bytes(state),
        **measured,
        "rounds": rounds,
        "seconds": time.perf_counter() - clock,
        "load_start": list(load_start),
        "load_end": list(os.getloadavg()),
    }
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------- parent


def planned_parameters(size: str) -> int:
    """Parameters of a size, counted on the meta device (nothing allocated)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape: dict[str, Any] = dict(MODEL_SIZES[size])
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(**shape))
    return parameter_count(model)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def per_round(ratios: list[float], digits: int = 2) -> str:
    """The round-by-round spread of a figure: ``"rounds min / median / max: 0.21 / 0.24 / 0.30"``."""
    return (
        f"rounds min / median / max: {min(ratios):.{digits}f} / {_median(ratios):.{digits}f} / "
        f"{max(ratios):.{digits}f}"
    )


def size_figures(result: dict) -> list[Figure]:
    size, samples = result["size"], result["samples"]
    rounds = len(samples["blocked"])
    blocked, clone, background = samples["blocked"], samples["clone"], samples["background"]
    floor = [w + r for w, r in zip(samples["write"], samples["read"], strict=True)]
    file_mib = result["file_bytes"] / 2**20
    saved_mib = result["save_file_bytes"] / 2**20
    gib = result["file_bytes"] / 2**30
    state = result["state_bytes"]
    memory = result["memory"]

    ratio_a = _median(blocked) / _median(clone)
    ratio_b = _median(background) / _median(floor)
    ours_mibs = file_mib / _median(background)
    theirs_mibs = saved_mib / _median(samples["save_file"])
    ratio_c = ours_mibs / theirs_mibs
    peak = memory["snapshots_peak"] - memory["base"]
    base = memory["base"]
    close_peak = memory["close_peak"] - base
    per_gib = [b / gib for b in background]
    first = memory["first"]
    how_peak = "sampled every 5 ms and VmHWM" if memory["hwm_usable"] else "sampled every 5 ms"
    return [
        Figure(
            "a",
            f"blocked time / distinct clone, {size}",
            ratio_a,
            target="<= 0.3",
            met=ratio_a <= 0.3,
            note=(
                f"push {_median(blocked) * 1e3:.0f} ms vs clone {_median(clone) * 1e3:.0f} ms, medians of "
                f"{rounds}; " + per_round([a / b for a, b in zip(blocked, clone, strict=True)])
            ),
        ),
        Figure(
            "b",
            f"background work per snapshot / (durable write + read of the same bytes), {size}",
            ratio_b,
            target="<= 1.5",
            met=ratio_b <= 1.5,
            note=(
                f"{_median(background):.2f} s vs write {_median(samples['write']):.2f} s + read "
                f"{_median(samples['read']):.2f} s of {file_mib:.0f} MiB in {CHUNK // 2**20} MiB chunks; "
                + per_round([a / b for a, b in zip(background, floor, strict=True)])
            ),
        ),
        Figure(
            "c",
            f"end-to-end background throughput / durable save_file+fsync, {size}",
            ratio_c,
            target=">= 0.8",
            met=ratio_c >= 0.8,
            note=(
                f"{ours_mibs:.0f} vs {theirs_mibs:.0f} MiB/s; "
                + per_round(
                    [
                        (file_mib / b) / (saved_mib / s)
                        for b, s in zip(background, samples["save_file"], strict=True)
                    ]
                )
            ),
        ),
        Figure(
            "d",
            f"peak added memory / state, {size}",
            peak / state,
            target="<= 2.2",
            met=peak / state <= 2.2,
            note=(
                f"{peak / 2**20:.0f} MiB over the built model's resident size, "
                f"state {state / 2**20:.0f} MiB; "
                f"the first {memory['snapshots']} snapshots (2 evicting), nothing else allocating; "
                f"{how_peak}; close() in the next row"
            ),
        ),
        Figure(
            "d",
            f"added by close() + release() over the resident size before it / state, {size}",
            (memory["close_peak"] - memory["before_close"]) / state,
            note=(
                f"peak during close() {close_peak / 2**20:.0f} MiB over the built model's resident size, "
                f"{(memory['before_close'] - base) / 2**20:.0f} MiB before it; the window idle, its last "
                "write finished"
            ),
        ),
        Figure(
            "e",
            f"background work per GiB of snapshot, {size}",
            _median(background) / gib,
            unit="s/GiB",
            note=f"{gib:.2f} GiB per snapshot file; " + per_round(per_gib),
        ),
        Figure(
            "first",
            f"first snapshot, blocked time / steady blocked time, {size}",
            first["blocked"] / _median(blocked),
            note=(
                f"first push {first['blocked']:.2f} s (allocating the reused {file_mib:.0f} MiB image), "
                f"background {first['background']:.2f} s (no eviction yet) vs steady "
                f"{_median(blocked):.2f} s and {_median(background):.2f} s"
            ),
        ),
    ]


def growth_figure(results: list[dict]) -> Figure | None:
    """Seconds per GiB at the largest size run over the smallest's (774M / 124M in a full run)."""
    if len(results) < 2:
        return None
    small, large = results[0], results[-1]

    def per_gib(result: dict) -> list[float]:
        gib = result["file_bytes"] / 2**30
        return [b / gib for b in result["samples"]["background"]]

    low, high = per_gib(small), per_gib(large)
    ratio = _median(high) / _median(low)
    return Figure(
        "e",
        f"background seconds per GiB, {large['size']} / {small['size']}",
        ratio,
        target="<= 1.2",
        met=ratio <= 1.2,
        note=(
            f"{_median(high):.2f} vs {_median(low):.2f} s/GiB; rounds {min(high):.2f}-{max(high):.2f} vs "
            f"{min(low):.2f}-{max(low):.2f} (separate processes, not paired round by round)"
        ),
    )


def load_text(values: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


def commit_text() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "checkpoint_stability"):
        commit += " with uncommitted changes in checkpoint_stability/"
    return commit


def rounds_table(results: list[dict]) -> str:
    lines = [
        "| size | round | push | clone | background | floor write | floor read | save_file+fsync |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        samples = result["samples"]
        for index in range(len(samples["blocked"])):
            lines.append(
                f"| {result['size']} | {index + 1} | {samples['blocked'][index]:.3f} | "
                f"{samples['clone'][index]:.3f} | {samples['background'][index]:.2f} | "
                f"{samples['write'][index]:.2f} | {samples['read'][index]:.2f} | "
                f"{samples['save_file'][index]:.2f} |"
            )
    return "\n".join(lines)


HOW_TO_READ = """\
How to read this. Each size ran in its own process (`--child`), one after the other, on the same
disk; within it the four sides (the window's snapshot, a distinct clone, the durable floor, a durable
`save_file`) alternated round by round, the order reversed every round, so the load of other jobs and
the disk's mood fall on all of them. The value is the ratio of the medians over the steady rounds;
"rounds min / median / max" is the spread of the same ratio taken round by round: how far one round
can be off. Every steady snapshot evicts one (window 3, full), so the background time is the whole
per-snapshot cost off the training thread: the listener (window average: add, subtract the evicted
file read back and verified, a slice of the exact re-sum; drift), the file write with its fsyncs and
checksum, the manifest, the eviction. The floor (b) is what no implementation can avoid with durable
files: writing the snapshot's bytes once and reading the evicted one's bytes once, in 32 MiB system
calls; a figure of 1 means the path costs no more than its own I/O. (c) compares with what a user would
write by hand, `save_file` and an fsync, which neither reads anything back nor keeps an average.
Memory (d) is one run of `window + 2` snapshots per size, before the timed rounds, against the resident
size of the process once the model was built; the budget the issue sets is 2.2 x the state (the reused
file image, the float32 accumulator, slices). Linear growth (e): seconds per GiB should not rise with
the size; the cross-size ratio compares separate processes, so its spread is given as each side's
range. The per-round table below gives every timed sample, in seconds."""


def results_section(results, skipped, command, started, elapsed, load_start, load_end, figures) -> str:
    from benchmarks.run import machine, table, versions

    info = machine()
    version = versions()
    per_size = "; ".join(
        f"{r['size']} {r['seconds'] / 60:.1f} min, "
        f"load {load_text(r['load_start'])} -> {load_text(r['load_end'])}"
        for r in results
    )
    not_run = "".join(f"\n- **{size} not run**: {reason}" for size, reason in skipped)
    not_run = "\n" + not_run if not_run else ""  # a blank line between the paragraph and the list
    about = textwrap.fill(
        f"Produced by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} minutes, at commit "
        f"{commit_text()}. Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, no GPU; torch "
        f"{version['torch']}, safetensors {version['safetensors']}, transformers {version['transformers']}, "
        f"torch threads 2. Load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end; "
        f"per size (its process's time, and the load at its start and end): {per_size}. GPT-2-shaped "
        "`GPT2LMHeadModel`s, float32, randomly initialised; `SnapshotWindow(StabilityConfig(window=3))`, "
        f"no tasks, {'drift on (the default)' if DRIFT else 'drift off (drift=False)'}.",
        width=105,
        break_on_hyphens=False,
    )
    return f"""{HEADING if DRIFT else HEADING_NO_DRIFT}

{about}{not_run}

{table(figures)}

{HOW_TO_READ}

{rounds_table(results)}
"""


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of RESULTS.md (from its heading to the next ``## `` heading), or
    append it at the end."""
    text = path.read_text() if path.exists() else ""
    heading = HEADING if DRIFT else HEADING_NO_DRIFT
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)} (default: all)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="steady rounds per size (default 5)")
    parser.add_argument(
        "--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="where to write the section"
    )
    parser.add_argument("--no-write", action="store_true", help="print the figures only")
    parser.add_argument(
        "--no-drift", action="store_true", help="the window without the weight drift (its own section)"
    )
    parser.add_argument("--child", metavar="SIZE", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DRIFT
    DRIFT = not args.no_drift
    if args.child:
        child(args.child, args.rounds, args.workdir or Path(tempfile.gettempdir()))
        return
    sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
    unknown = [size for size in sizes if size not in MODEL_SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    import psutil

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_text(list(os.getloadavg()))
    clock = time.perf_counter()
    results: list[dict] = []
    skipped: list[tuple[str, str]] = []
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="cs-scale-") as workdir:
        for size in sizes:
            needed = RESIDENT_STATES * 4 * planned_parameters(size) + 2**30
            available = psutil.virtual_memory().available
            if needed > available:
                reason = (
                    f"needs about {needed / 2**30:.0f} GiB resident ({RESIDENT_STATES} x its float32 state + "
                    f"1 GiB), {available / 2**30:.0f} GiB available"
                )
                skipped.append((size, reason))
                print(f"[{size}: not run: {reason}]", flush=True)
                continue
            begin = time.perf_counter()
            line = run_child(
                "scale",
                "--child",
                size,
                "--rounds",
                str(args.rounds),
                "--workdir",
                workdir,
                *(["--no-drift"] if args.no_drift else []),
                timeout=3600,
            )
            result = json.loads(line)
            results.append(result)
            produced = size_figures(result)
            figures.extend(produced)
            print(f"[{size}: {time.perf_counter() - begin:.0f} s]", flush=True)
            for figure in produced:
                print(f"  {figure.name}: {figure.shown()} (target {figure.target or 'report'})", flush=True)
    growth = growth_figure(results)
    if growth is not None:
        figures.append(growth)
    elapsed = time.perf_counter() - clock
    load_end = load_text(list(os.getloadavg()))
    from benchmarks.run import table

    print()
    print(table(figures))
    for size, reason in skipped:
        print(f"{size} not run: {reason}")
    print(f"\n{elapsed / 60:.1f} minutes; load average {load_start} at the start, {load_end} at the end")
    if not args.no_write and results:
        command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
        if not sys.argv[1:]:
            command = "make bench-scale  (= .venv/bin/python benchmarks/scale.py)"
        section = results_section(
            results, skipped, command.strip(), started, elapsed, load_start, load_end, figures
        )
        write_section(args.output, section)
        print(f"written the scale section of {args.output}")


if __name__ == "__main__":
    main()
