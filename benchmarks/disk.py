"""Item 6: the snapshot file write against a plain ``safetensors.torch.save_file``, and bf16 on disk.

The buffer's write is durable: serialise, write to a temporary name, fsync, rename, fsync the directory,
checksum (BLAKE3), rewrite the manifest the same way. ``save_file`` only hands the bytes to the page
cache, so it is also shown with an fsync added, the like-for-like comparison.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file

from benchmarks.harness import Figure, gpt2, ratio_spread, state_bytes, timed
from checkpoint_stability.buffer import SnapshotBuffer
from checkpoint_stability.state_dicts import capture_state, live_tensors


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    size = "1M" if quick else "124M"
    model = gpt2(size)
    live = live_tensors(model)
    captured = capture_state(live)
    total = state_bytes(live)
    figures = []
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        directory = Path(directory)
        buffer = SnapshotBuffer(directory / "buffer", window=2)
        steps = iter(range(1, 10_000))
        names = iter(range(10_000))

        def plain(fsync: bool):
            path = directory / f"plain-{next(names)}.safetensors"
            save_file(captured.tensors, str(path))
            if fsync:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            path.unlink()

        samples: dict[str, list[float]] = {
            "buffer": [],
            "buffer, fsync skipped": [],
            "save_file": [],
            "save_file+fsync": [],
        }
        for round_ in range(4):  # the first round is a warm-up
            gc.collect()
            # The buffer writes on its own thread from the moment push() hands the copy over: the write
            # takes as long as wait() blocks after that.
            buffer.push(next(steps), live)
            samples["buffer"].append(timed(buffer.wait))
            gc.collect()
            # The same write with its fsyncs made no-ops (here only, to measure it): the writer's own
            # cost, without the wait for the disk that a plain save_file does not pay either.
            with mock.patch("os.fsync"):
                buffer.push(next(steps), live)
                samples["buffer, fsync skipped"].append(timed(buffer.wait))
            gc.collect()
            samples["save_file"].append(timed(lambda: plain(False)))
            gc.collect()
            samples["save_file+fsync"].append(timed(lambda: plain(True)))
            if round_ == 0:
                samples = {name: [] for name in samples}
        times = {name: statistics.median(values) for name, values in samples.items()}
        buffer.close()
        mb = total / 2**20
        for ours, reference in (
            ("buffer", "save_file"),
            ("buffer", "save_file+fsync"),
            ("buffer, fsync skipped", "save_file"),
        ):
            ratio = times[reference] / times[ours]
            figures.append(
                Figure(
                    "6",
                    f"{ours} write throughput / {reference} ({size})",
                    ratio,
                    target=">= 0.8",
                    met=ratio >= 0.8,
                    note=(
                        f"{mb / times[ours]:.0f} vs {mb / times[reference]:.0f} MB/s ({mb:.0f} MB), "
                        f"medians of 3; " + ratio_spread(samples[reference], samples[ours])
                    ),
                )
            )
        sizes = {}
        for dtype in (None, torch.bfloat16):
            stored = SnapshotBuffer(directory / f"dtype-{dtype}", window=1, storage_dtype=dtype)
            stored.push(1, live)
            stored.close()
            sizes[dtype] = stored.entries[-1].bytes
        ratio = sizes[torch.bfloat16] / sizes[None]
        figures.append(
            Figure(
                "6",
                f"bytes on disk, bf16 storage / float32 ({size})",
                ratio,
                target="0.5",
                met=abs(ratio - 0.5) < 0.01,
                note=f"{sizes[torch.bfloat16] / 2**20:.0f} vs {sizes[None] / 2**20:.0f} MB",
            )
        )
    return figures, {size: sum(p.numel() for p in model.parameters())}
