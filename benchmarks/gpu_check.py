"""Issue 19's GPU check: the snapshot path on CUDA, and the Hugging Face Trainer with FSDP2 on one GPU
(``make gpu-check``).

**Not yet run on a GPU.** These machines have none: the code below has only been imported and linted,
and on a machine without CUDA it prints one line saying so and exits 0. It stays marked as not run until
a GPU run's figures are in ``benchmarks/RESULTS.md``. It needs a CUDA build of torch in ``.venv``
(``make install`` here installs the CPU build).

    python benchmarks/gpu_check.py                      # both parts, 5 timed rounds
    python benchmarks/gpu_check.py --rounds 2 --trainer-size 124M

1. **The snapshot path.** A ~1B-parameter GPT-2-shaped model (985M, float32) on one GPU, a
   ``SnapshotWindow(StabilityConfig(window=3))`` with no tasks, as in ``benchmarks/scale.py``. For CUDA
   weights, ``SnapshotBuffer.push`` copies into pinned host buffers reused from one snapshot to the next,
   non-blocking on a side stream (``state_dicts.PinnedStaging``), and the writer thread waits for the
   copy's event before writing. Per snapshot, after the previous one's background work has finished and
   the GPU is idle: the time ``push`` blocks the calling thread, the time until the copy has landed
   (``torch.cuda.synchronize()`` after the push: the training stream waits for the copy on the GPU
   before its next kernel), and the background time from ``push`` returning to ``wait`` returning
   (copy, write, fsync, window average, drift, eviction); against a plain ``{name: tensor.to("cpu")}`` of
   the same distinct tensors, which blocks for the whole copy into pageable memory. The two sides
   alternate, the order reversed every round; the first snapshot (allocating the pinned buffers) is given
   apart, the next ``window + 1`` fill the window and warm up, and the timed rounds all evict one.
2. **The Hugging Face Trainer with FSDP2** on one GPU, in a ``torchrun --standalone --nproc_per_node 1``
   process (the Trainer's FSDP needs a distributed launch even for one process), with
   ``StabilityCallback(tasks=[], window=3, every_n_steps=2)`` from ``checkpoint_stability.callbacks``.
   Every parameter is a DTensor, so the callback buffers each rank's local shards under
   ``buffer/rank-0``. Per snapshot step: the callback's ``on_step_end`` as the training thread sees it,
   the same until the copy has landed on the host, and its background work, which this check waits for
   right after each snapshot in order to time it (a real run overlaps it with the next steps).

Nothing is asserted: these are measurements, printed as a table.
"""

from __future__ import annotations

import os

# As in run.py: OpenMP threads that spin while they wait fight the other processes for the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.harness import REPO, Figure, distinct_tensors, gpt2, parameter_count, perturb
from benchmarks.scale import WINDOW, open_window, per_round, snapshot_file_bytes

TRAINER_EVERY = 2
"""Snapshot every this many optimizer steps in the Trainer part."""


def snapshot_path(size: str, rounds: int, directory: Path) -> list[Figure]:
    """Part 1: ``SnapshotWindow.push`` of CUDA weights against a plain ``.to("cpu")``, side by side."""
    model = gpt2(size).to("cuda")
    state = model.state_dict()
    distinct = distinct_tensors(state)
    samples: dict[str, list[float]] = {name: [] for name in ("blocked", "landed", "background", "to_cpu")}
    first: dict[str, float] = {}
    window = open_window(directory)
    try:
        first_measured = WINDOW + 3
        for step in range(1, first_measured + rounds):
            perturb(model)
            measured = step >= first_measured
            sides = ["window", "to_cpu"] if step % 2 == 0 else ["to_cpu", "window"]
            if step == 1:
                sides = ["window"]  # the first push allocates the pinned buffers: kept apart
            for side in sides:
                gc.collect()
                torch.cuda.synchronize()
                if side == "window":
                    start = time.perf_counter()
                    window.push(step, state)
                    returned = time.perf_counter()
                    torch.cuda.synchronize()
                    landed = time.perf_counter()
                    window.wait()
                    done = time.perf_counter()
                    timings = {
                        "blocked": returned - start,
                        "landed": landed - start,
                        "background": done - returned,
                    }
                    if step == 1:
                        first = timings
                    if measured:
                        for name, value in timings.items():
                            samples[name].append(value)
                else:
                    start = time.perf_counter()
                    copy = {name: tensor.to("cpu") for name, tensor in distinct.items()}
                    elapsed = time.perf_counter() - start
                    del copy
                    if measured:
                        samples["to_cpu"].append(elapsed)
        file_bytes = snapshot_file_bytes(directory)
        window.close()
    finally:
        window.release()
    parameters = parameter_count(model)
    del model, state, distinct
    gc.collect()
    torch.cuda.empty_cache()

    def median(name: str) -> float:
        return statistics.median(samples[name])

    mib = file_bytes / 2**20
    label = f"{size} ({parameters / 1e6:.0f}M parameters, float32, window {WINDOW})"
    return [
        Figure(
            "gpu",
            f"push blocked time / .to('cpu'), {label}",
            median("blocked") / median("to_cpu"),
            note=(
                f"push {median('blocked') * 1e3:.1f} ms vs .to('cpu') {median('to_cpu') * 1e3:.0f} ms, "
                f"medians of {rounds}; "
                + per_round([a / b for a, b in zip(samples["blocked"], samples["to_cpu"], strict=True)])
            ),
        ),
        Figure(
            "gpu",
            f"push until the copy has landed / .to('cpu'), {size}",
            median("landed") / median("to_cpu"),
            note=(
                f"{median('landed') * 1e3:.0f} ms: the side stream's copy into pinned memory; "
                + per_round([a / b for a, b in zip(samples["landed"], samples["to_cpu"], strict=True)])
            ),
        ),
        Figure(
            "gpu",
            f"background time per snapshot, {size}",
            median("background"),
            unit="s",
            note=(
                f"{mib / median('background'):.0f} MiB/s end to end ({mib:.0f} MiB per snapshot file, every "
                f"snapshot evicting one); rounds {min(samples['background']):.2f}-"
                f"{max(samples['background']):.2f} s"
            ),
        ),
        Figure(
            "gpu",
            f"first snapshot (allocating the pinned buffers), blocked time, {size}",
            first["blocked"],
            unit="s",
            note=(
                f"copy landed after {first['landed']:.2f} s, background {first['background']:.2f} s (no "
                "eviction yet)"
            ),
        ),
    ]


def trainer_child(size: str, steps: int, output_dir: Path) -> None:
    """Part 2, inside ``torchrun``: a Trainer with FSDP2 and a timed ``StabilityCallback``; prints a table."""
    from transformers import Trainer, TrainingArguments

    from checkpoint_stability.callbacks.transformers import StabilityCallback

    class TimedStabilityCallback(StabilityCallback):
        """The callback, each snapshot step's ``on_step_end`` timed and its background work waited for."""

        def __init__(self, **settings):
            super().__init__(**settings)
            self.samples: dict[str, list[float]] = {"blocked": [], "landed": [], "background": []}
            self.step_times: list[float] = []
            self._last_end: float | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now = time.perf_counter()
            snapshot = self.monitor is not None and self.monitor.should_snapshot(state.global_step)
            if self._last_end is not None and not snapshot:
                self.step_times.append(now - self._last_end)
            if not snapshot or self.monitor is None:
                super().on_step_end(args, state, control, model=model, **kwargs)
                self._last_end = time.perf_counter()
                return
            torch.cuda.synchronize()
            start = time.perf_counter()
            super().on_step_end(args, state, control, model=model, **kwargs)
            returned = time.perf_counter()
            torch.cuda.synchronize()
            landed = time.perf_counter()
            self.monitor.window.wait()
            done = time.perf_counter()
            self.samples["blocked"].append(returned - start)
            self.samples["landed"].append(landed - start)
            self.samples["background"].append(done - returned)
            self._last_end = None  # the next step's time would include this wait

    model = gpt2(size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (64, 128), generator=generator)
    train = [{"input_ids": row, "labels": row} for row in ids]
    callback = TimedStabilityCallback(tasks=[], window=WINDOW, every_n_steps=TRAINER_EVERY, console=False)
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=0,
        # transformers 5.x spelling: fsdp=True (typed str for its command line, documented as a flag), the
        # rest in fsdp_config; "full_shard" is FSDP2's reshard_after_forward=True, and passing the strategy
        # as a string is deprecated.
        fsdp=True,  # type: ignore[arg-type]
        fsdp_config={"version": 2, "reshard_after_forward": True},
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train, callbacks=[callback])
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    buffer = output_dir / "stability"  # buffer/, or buffer/rank-0/ for sharded weights
    file_bytes = snapshot_file_bytes(buffer)
    mib = file_bytes / 2**20
    samples = callback.samples
    # The first snapshot allocates the pinned buffers; the next two fill the window.
    steady = {name: values[WINDOW:] or values for name, values in samples.items()}
    step_time = statistics.median(callback.step_times) if callback.step_times else float("nan")

    def median(name: str) -> float:
        return statistics.median(steady[name])

    figures = [
        Figure(
            "fsdp2",
            f"Trainer step time without a snapshot, {size}",
            step_time * 1e3,
            unit="ms",
            note=f"median of {len(callback.step_times)} steps, batch 2 x 128 tokens, FSDP2 on one GPU",
        ),
        Figure(
            "fsdp2",
            f"snapshot step's on_step_end (training thread) / step time, {size}",
            median("blocked") / step_time,
            note=(
                f"{median('blocked') * 1e3:.1f} ms, median of {len(steady['blocked'])} steady snapshots; "
                f"first snapshot {samples['blocked'][0] * 1e3:.0f} ms"
            ),
        ),
        Figure(
            "fsdp2",
            f"snapshot step's on_step_end until the copy has landed, {size}",
            median("landed") * 1e3,
            unit="ms",
        ),
        Figure(
            "fsdp2",
            f"background time per snapshot, {size}",
            median("background"),
            unit="s",
            note=(
                f"{mib / median('background'):.0f} MiB/s end to end; {mib:.0f} MiB per file; files under "
                f"{', '.join(sorted({p.parent.name for p in buffer.rglob('step-*.safetensors')}))}"
            ),
        ),
    ]
    from benchmarks.run import table

    print(table(figures), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1B", help="the snapshot path's model (default 1B: 985M)")
    parser.add_argument("--rounds", type=int, default=5, help="timed snapshots of the snapshot path")
    parser.add_argument(
        "--trainer-size", default="355M", help="the Trainer's model (default 355M: AdamW fits in 12 GB)"
    )
    parser.add_argument("--trainer-steps", type=int, default=16, help="optimizer steps (a snapshot every 2)")
    parser.add_argument("--trainer-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            f"gpu-check: CUDA is not available (torch {torch.__version__}), so nothing was measured; "
            "run it on a machine with a GPU and a CUDA build of torch."
        )
        return 0
    if args.trainer_child is not None:
        trainer_child(args.trainer_size, args.trainer_steps, args.trainer_child)
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    from benchmarks.run import table

    with tempfile.TemporaryDirectory(prefix="cs-gpu-check-") as workdir:
        figures = snapshot_path(args.size, args.rounds, Path(workdir) / "window")
        print(table(figures), flush=True)
        print(f"\nHugging Face Trainer, FSDP2, one GPU, {args.trainer_size}:", flush=True)
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                str(Path(__file__).resolve()),
                "--trainer-size",
                args.trainer_size,
                "--trainer-steps",
                str(args.trainer_steps),
                "--trainer-child",
                str(Path(workdir) / "trainer"),
            ],
            cwd=REPO,
            check=False,
        )
    if completed.returncode != 0:
        print(f"gpu-check: the Trainer part failed (exit code {completed.returncode})", file=sys.stderr)
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
