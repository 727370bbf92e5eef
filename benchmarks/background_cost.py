"""Item 10: what background evaluation costs training, and how far the evaluator lags behind.

* **Training-side pause per snapshot.** ``StabilityMonitor([], evaluation="background")``'s whole
  ``on_snapshot(model, step)`` call, as the training loop sees it (the writer thread still in flight when
  it returns), against the floor: ``model.state_dict()`` and one ``clone()`` per distinct tensor (the
  tied ``lm_head`` once). Side by side, the order alternating round by round; the demo's model and
  GPT-2 124M. "Spaced": the previous snapshot's write had finished (``window.wait()``, untimed), as
  when snapshots are further apart than a write takes. "Back to back": pushed right after the previous
  snapshot, so the call includes waiting for that write (one write is in flight at most).
* **Copying a small tensor.** Why the snapshot image copies tensors of up to 1 MiB with numpy's memcpy:
  numpy's ``copyto`` ÷ torch's ``copy_`` of one float32 tensor into a reused buffer, 128 KiB to 16 MiB,
  alternating, each after a 2 ms pause; in a child process with idle OpenMP threads that sleep
  (``OMP_WAIT_POLICY=PASSIVE``) and in one with threads that spin (``ACTIVE``).
* **The demo's training wall time.** The demo's model, batch, optimizer and tasks (window 5, every 20
  steps, horizon 10, best-average export), trained in a plain loop three ways: no callback, inline
  evaluation, background evaluation with a ``BackgroundEvaluator`` in its own process. The training
  runs in one child process pinned to one core (``os.sched_setaffinity``, ``torch.set_num_threads(1)``),
  the evaluator in another pinned to the other core (1 thread), its tasks and model built before the
  first round; it follows each background round's run directory from the start to the end of that
  training, and finishes its last snapshot before the next round starts. The configurations alternate
  round by round (rotated order), each round from the same initial weights and batches; the timed span
  is ``open`` + the steps + ``close`` (the evaluator's catching up after training is not training time;
  it is in the lag). Beside the wall time: the training process's CPU time (all its threads: training,
  snapshot writer, hashing) and the seconds its training thread waited in the run queue for a CPU
  (``/proc/thread-self/schedstat``), which tell the process's own extra work from the time other
  processes took its core.
* **Evaluator lag.** ``FollowResult.lags`` of the background rounds: seconds from each snapshot's file
  being committed to its records being written, with the follow command's default poll interval (1 s).

Standalone: ``python -m benchmarks.background_cost [--quick]`` prints the figures and the run's date and
load, for the item's section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os

# As in run.py: OpenMP threads that spin while they wait fought the other jobs on these 2-core machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import (
    REPO,
    Figure,
    bare_clone,
    distinct_tensors,
    gpt2,
    parameter_count,
    ratio_spread,
    timed,
)

ITEM = "10"
CONFIGS = ("none", "inline", "background")
POLL_SECONDS = 1.0  # the default of `checkpoint-stability follow --poll`


# ------------------------------------------------------------------------------ 1. the training-side pause


def timed_after_gc(fn) -> float:
    """Seconds of ``fn()``, garbage collected first (as ``harness.interleaved`` does)."""
    gc.collect()
    return timed(fn)


def pause_samples(model: torch.nn.Module, rounds: int, workdir: Path) -> dict[str, list[float]]:
    """Per round: the bare copy, a spaced ``on_snapshot`` and a back-to-back one, the bare copy first on
    even rounds and last on odd ones; one warm-up round."""
    from checkpoint_stability import StabilityMonitor

    monitor = StabilityMonitor(
        [], dirpath=workdir, evaluation="background", window=3, every_n_steps=1, console=False, report=False
    )
    monitor.open(model=model)
    # No evaluator follows this run: past max_pending the writer thread drops the oldest unevaluated
    # snapshot (off the training thread) and warns each time.
    buffer_log = logging.getLogger("checkpoint_stability.buffer")
    level = buffer_log.level
    buffer_log.setLevel(logging.ERROR)
    steps = iter(range(1, 1_000_000))
    samples: dict[str, list[float]] = {"clone": [], "spaced": [], "back to back": []}

    def clone() -> float:
        monitor.window.wait()  # untimed, as for the spaced snapshot: no write competes with the copy
        gc.collect()
        start = time.perf_counter()
        bare_clone(distinct_tensors(model.state_dict()))
        return time.perf_counter() - start

    def snapshot() -> None:
        monitor.on_snapshot(model, next(steps))

    try:
        for round_ in range(1 + rounds):
            timings: dict[str, float] = {}
            if round_ % 2 == 0:
                timings["clone"] = clone()
            monitor.window.wait()  # untimed: the previous write has finished
            timings["spaced"] = timed_after_gc(snapshot)
            timings["back to back"] = timed_after_gc(snapshot)  # waits for the spaced snapshot's write
            if round_ % 2 == 1:
                timings["clone"] = clone()
            if round_ >= 1:
                for name, value in timings.items():
                    samples[name].append(value)
    finally:
        monitor.close()
        buffer_log.setLevel(level)
    return samples


def pause_figures(name: str, model: torch.nn.Module, rounds: int, workdir: Path) -> list[Figure]:
    samples = pause_samples(model, rounds, workdir / f"pause-{name}")
    clone = statistics.median(samples["clone"])
    spaced = statistics.median(samples["spaced"])
    queued = statistics.median(samples["back to back"])
    ratio = spaced / clone
    return [
        Figure(
            ITEM,
            f"training-side pause per snapshot, background mode / bare state-dict copy, {name}",
            ratio,
            target="<= 1.25",
            met=ratio <= 1.25,
            note=(
                f"on_snapshot {spaced * 1e3:.2f} ms vs state_dict() + clone {clone * 1e3:.2f} ms, medians of "
                f"{rounds}; {ratio_spread(samples['spaced'], samples['clone'])}; the previous write had "
                "finished"
            ),
        ),
        Figure(
            ITEM,
            f"the same, snapshots back to back (previous write in flight) / bare copy, {name}",
            queued / clone,
            note=(
                f"{queued * 1e3:.1f} ms: the push waits for the previous snapshot's write (file, fsync, "
                f"checksum, average, manifest); {ratio_spread(samples['back to back'], samples['clone'])}"
            ),
        ),
    ]


# ------------------------------------------------------- 1b. how a small tensor is copied into the image

# Bytes of one float32 tensor, around the snapshot image's memcpy bound (buffer._MEMCPY_MAX_BYTES).
COPY_SIZES = (128 << 10, 1 << 20, 4 << 20, 16 << 20)
COPY_POLICIES = {"PASSIVE": "sleep", "ACTIVE": "spin"}


def copy_ways(source: torch.Tensor, target: torch.Tensor) -> dict[str, Callable[[], object]]:
    import numpy as np

    source_array, target_array = source.numpy(), target.numpy()
    return {"numpy": lambda: np.copyto(target_array, source_array), "torch": lambda: target.copy_(source)}


def copy_samples(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per size: numpy's memcpy and torch's ``copy_`` of one float32 tensor into a reused buffer,
    alternating, each after a 2 ms pause (the intra-op threads idle, as between training steps)."""
    samples: dict[str, dict[str, list[float]]] = {}
    for size in COPY_SIZES:
        ways = copy_ways(torch.randn(size // 4), torch.empty(size // 4))
        samples[str(size)] = {way: [] for way in ways}
        for round_ in range(1 + rounds):
            for way, copy in ways.items() if round_ % 2 else reversed(ways.items()):
                time.sleep(0.002)
                elapsed = timed(copy)
                if round_ >= 1:
                    samples[str(size)][way].append(elapsed)
    return samples


def copy_figures(rounds: int) -> list[Figure]:
    """numpy's memcpy ÷ torch's copy_ per size, in a child process per OpenMP wait policy (the policy is
    read when OpenMP starts): threads that sleep while idle, and threads that spin."""
    figures = []
    for policy, idle in COPY_POLICIES.items():
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.background_cost", "--copy", f"--rounds={rounds}"],
            cwd=REPO,
            env={**os.environ, "OMP_WAIT_POLICY": policy},
            capture_output=True,
            text=True,
            check=True,
        )
        samples = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("{")))

        def ratio(size: int, samples: dict = samples) -> float:
            pair = samples[str(size)]
            return statistics.median(pair["numpy"]) / statistics.median(pair["torch"])

        bound = 1 << 20
        numpy_us, torch_us = (statistics.median(samples[str(bound)][way]) * 1e6 for way in ("numpy", "torch"))
        figures.append(
            Figure(
                ITEM,
                f"copy of one 1 MiB float32 tensor into the image, numpy memcpy / torch copy_, idle OpenMP "
                f"threads {idle} (OMP_WAIT_POLICY={policy})",
                ratio(bound),
                note=(
                    f"{numpy_us:.0f} vs {torch_us:.0f} us, medians of {rounds}; other sizes: "
                    + ", ".join(f"{size >> 10} KiB {ratio(size):.2f}" for size in COPY_SIZES if size != bound)
                    + f"; torch threads {torch.get_num_threads()}"
                ),
            )
        )
    return figures


# -------------------------------------------------------------------- 2 and 3. wall time and evaluator lag


def cores() -> list[int]:
    """The cores this process may run on (empty where affinity is not supported)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin(core: int | None) -> str:
    """Pin this process to ``core`` (None: leave it), one torch thread; what was done."""
    torch.set_num_threads(1)
    if core is None:
        return "no core of its own (fewer than 2 cores)"
    os.sched_setaffinity(0, {core})
    return f"core {core}"


def evaluator_main(core: int | None) -> None:
    """The evaluator process: build the demo's tasks and model and say so; then, for each run directory
    read from stdin, follow that run to its end and print the ``FollowResult``."""
    where = pin(core)
    from benchmarks.demo_setup import demo_setup
    from checkpoint_stability.evaluator import BackgroundEvaluator

    model, tasks, _, _ = demo_setup()
    print(json.dumps({"ready": where}), flush=True)
    for line in sys.stdin:
        run_dir = Path(line.strip())
        while not (run_dir / "run.json").exists():
            time.sleep(0.01)
        evaluator = BackgroundEvaluator(run_dir, tasks, model, console=False, poll_interval=POLL_SECONDS)
        result = evaluator.run(timeout=300)
        print(json.dumps(dataclasses.asdict(result)), flush=True)


class Evaluator:
    """One evaluator process for every background round (its start-up, about 6 s of imports and data, is
    paid once, while the trainer sets up): told each round's run directory before that training opens it.
    """

    def __init__(self, core: int | None):
        self.child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.background_cost", "--evaluator"]
            + ([] if core is None else [f"--core={core}"]),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.where = ""

    def ready(self) -> None:
        self.where = json.loads(self._line())["ready"]

    def _line(self) -> str:
        """The evaluator's next JSON line; other lines are skipped (a library's log lines on stdout, such as
        DeepSpeed's when transformers imports it)."""
        while True:
            line = self.child.stdout.readline()
            if not line:
                self.child.wait()
                raise RuntimeError(f"the evaluator process exited ({self.child.returncode})")
            if line.startswith("{"):
                return line

    def follow(self, run_dir: Path) -> None:
        self.child.stdin.write(f"{run_dir}\n")
        self.child.stdin.flush()

    def result(self) -> dict:
        return json.loads(self._line())

    def close(self, finished: bool) -> None:
        """Let it end after the last round; kill it (this process started it) if a round failed."""
        if not finished:
            self.child.kill()
        self.child.stdin.close()
        self.child.wait(timeout=60)


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as handle:
            return int(handle.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def train_once(config: str, setup: dict, steps: int, every: int, run_dir: Path) -> dict[str, float]:
    """Train the demo model from its initial weights for ``steps`` steps, over open + steps + close: wall
    seconds, the process's CPU seconds (every thread: training, writer, hashing), and the seconds the
    training thread waited for a CPU."""
    from benchmarks.demo_setup import demo_optimizer
    from checkpoint_stability import StabilityMonitor

    model, demo = setup["model"], setup["demo"]
    model.load_state_dict(setup["initial"])
    model.train()
    optimizer = demo_optimizer(model, demo)
    monitor = None
    if config != "none":
        monitor = StabilityMonitor(
            setup["tasks"] if config == "inline" else [],
            dirpath=run_dir,
            evaluation=config,
            window=5,
            every_n_steps=every,
            horizon=demo.HORIZON,
            console=False,
            report=False,
        )
    gc.collect()
    start, cpu, waited = time.perf_counter(), time.process_time(), run_queue_wait()
    if monitor is not None:
        monitor.open(model=model)
    for step, ids in enumerate(setup["batches"][:steps], start=1):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(model, step)
    if monitor is not None:
        monitor.close()
    return {
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "waited": run_queue_wait() - waited,
    }


def trainer_main(steps: int, every: int, rounds: int, workdir: Path) -> None:
    """The training process: every configuration once per round, in rotated order; prints the results."""
    available = cores()
    trainer_core, evaluator_core = (available[0], available[1]) if len(available) >= 2 else (None, None)
    where = pin(trainer_core)
    evaluator = Evaluator(evaluator_core)  # it builds the tasks and model while this process does
    from benchmarks.demo_setup import demo_batches, demo_setup

    model, tasks, train_ids, demo = demo_setup()
    batches = demo_batches(train_ids, demo)
    setup = {
        "model": model,
        "tasks": tasks,
        "demo": demo,
        "initial": {k: v.clone() for k, v in model.state_dict().items()},
        "batches": [next(batches) for _ in range(steps)],
    }
    # Warm-up, untimed: the allocator, the optimizer's first steps, the tasks' first evaluation.
    train_once("none", setup, min(steps, 5), every, workdir / "warmup")
    for task in tasks:
        task.evaluate(model.eval())
    seconds: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    follows: list[dict] = []
    finished = False
    try:
        evaluator.ready()
        for round_ in range(rounds):
            for config in CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]:
                run_dir = workdir / f"round-{round_}-{config}"
                if config == "background":
                    evaluator.follow(run_dir)
                seconds[config].append(train_once(config, setup, steps, every, run_dir))
                if config == "background":
                    # It finishes the last snapshot before the next round's training starts.
                    follows.append(evaluator.result())
        finished = True
    finally:
        evaluator.close(finished)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "follows": follows,
                "trainer": where,
                "evaluator": evaluator.where,
                "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            }
        )
    )


def wall_time_figures(steps: int, every: int, rounds: int, workdir: Path) -> list[Figure]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.background_cost",
            "--trainer",
            f"--steps={steps}",
            f"--every={every}",
            f"--rounds={rounds}",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the training process failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    def series(config: str, key: str) -> list[float]:
        return [sample[key] for sample in result["seconds"][config]]

    def median(config: str, key: str) -> float:
        return statistics.median(series(config, key))

    none = median("none", "wall")
    waited = ", ".join(f"{config} {median(config, 'waited'):.2f} s" for config in CONFIGS)
    method = (
        f"{steps} steps, a snapshot every {every}, {rounds} rounds of the 3 configurations in rotated order; "
        f"training on {result['trainer']}, 1 torch thread; evaluator on {result['evaluator']}, 1 thread"
    )
    figures = []
    for config, name, target in (
        ("background", "background (evaluator on the other core) / no callback", "<= 1.05"),
        ("inline", "inline / no callback", None),
    ):
        value = median(config, "wall") / none
        figures.append(
            Figure(
                ITEM,
                f"demo training wall time, {name}",
                value,
                target=target,
                met=None if target is None else value <= 1.05,
                note=(
                    f"{median(config, 'wall'):.1f} vs {none:.1f} s, medians of {rounds}; "
                    f"{ratio_spread(series(config, 'wall'), series('none', 'wall'))}"
                    + (
                        f"; {method}; the training thread waited for a CPU (run queue, medians): {waited}"
                        if config == "background"
                        else ""
                    )
                ),
            )
        )
    cpu_none = median("none", "cpu")
    figures.append(
        Figure(
            ITEM,
            "demo training CPU time of the training process (all its threads), background / no callback",
            median("background", "cpu") / cpu_none,
            note=(
                f"{median('background', 'cpu'):.1f} vs {cpu_none:.1f} s; "
                f"{ratio_spread(series('background', 'cpu'), series('none', 'cpu'))}; "
                f"inline / no callback: {median('inline', 'cpu') / cpu_none:.2f}; the wall time beyond this "
                "is time waiting for a CPU"
            ),
        )
    )
    lags = [lag for follow in result["follows"] for lag in follow["lags"]]
    evaluated = sum(len(follow["evaluated"]) for follow in result["follows"])
    skipped = sum(len(follow["skipped"]) for follow in result["follows"])
    closed = all(follow["closed"] for follow in result["follows"])
    figures += [
        Figure(
            ITEM,
            "evaluator lag, snapshot written -> its records written, median (demo)",
            statistics.median(lags),
            unit="s",
            note=(
                f"{len(lags)} snapshots of the background rounds, {evaluated} evaluated, {skipped} skipped, "
                f"{'every run closed' if closed else 'a run NOT closed'}; poll interval {POLL_SECONDS:g} s "
                f"(the follow command's default); training takes {none / steps * every:.1f} s between "
                "snapshots without a callback"
            ),
        ),
        Figure(
            ITEM,
            "evaluator lag, maximum (demo)",
            max(lags),
            unit="s",
            note="per background round: " + ", ".join(f"{max(f['lags']):.1f}" for f in result["follows"]),
        ),
    ]
    return figures


# ------------------------------------------------------------------------------------------------- the item


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    from benchmarks.demo_setup import demo_setup

    demo_model = demo_setup()[0]
    sizes = {"demo": parameter_count(demo_model)}
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        directory = Path(directory)
        if quick:
            figures += pause_figures("demo", demo_model, 3, directory)
            figures += copy_figures(3)
            figures += wall_time_figures(steps=6, every=3, rounds=1, workdir=directory)
        else:
            figures += pause_figures("demo", demo_model, 60, directory)
            figures += copy_figures(40)
            model = gpt2("124M")
            figures += pause_figures("124M", model, 5, directory)
            sizes["124M"] = parameter_count(model)
            del model
            figures += wall_time_figures(steps=60, every=20, rounds=6, workdir=directory)
    return figures, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and steps: a smoke run")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--evaluator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--every", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluator:
        evaluator_main(args.core)
        return
    if args.copy:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        print(json.dumps(copy_samples(args.rounds)))
        return
    if args.trainer:
        trainer_main(args.steps, args.every, args.rounds, args.workdir)
        return
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
