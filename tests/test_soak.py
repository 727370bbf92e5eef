"""Long-run soak (make soak): 10,000 snapshots of a small model with window 20.

What must hold: buffer/ never holds more than window + 1 files, resident memory stays flat, the
history grows linearly, and the incremental average is still exact at the end.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors import safe_open

from checkpoint_stability import FunctionTask, StabilityMonitor

SNAPSHOTS = int(os.environ.get("SOAK_SNAPSHOTS", "10000"))
WINDOW = 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.soak
def test_ten_thousand_snapshots_stay_bounded_and_exact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    x = torch.randn(32, 64)
    targets = torch.randint(0, 4, (32,)).tolist()
    task = FunctionTask("probe", lambda m: m(x).argmax(-1).tolist(), targets=targets)
    monitor = StabilityMonitor(
        [task], dirpath=tmp_path, window=WINDOW, every_n_steps=1, console=False, tensorboard=False
    )
    buffer_dir = tmp_path / "buffer"
    most_files, memory, history_bytes = 0, {}, {}
    started = time.monotonic()
    for step in range(1, SNAPSHOTS + 1):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 1e-3)
        monitor.on_snapshot(model, step)
        if step % 100 == 0:
            most_files = max(most_files, sum(1 for p in buffer_dir.iterdir() if p.suffix == ".safetensors"))
        if step in (1_000, SNAPSHOTS // 2, SNAPSHOTS):
            memory[step] = resident_bytes()
            history_bytes[step] = (tmp_path / "history.jsonl").stat().st_size
    monitor.buffer.wait()
    elapsed = time.monotonic() - started

    # The average against a float64 mean of the window's files, read with safetensors' own reader.
    manifest = json.loads((buffer_dir / "manifest.json").read_text())
    assert [e["step"] for e in manifest["snapshots"]] == list(range(SNAPSHOTS - WINDOW + 1, SNAPSHOTS + 1))
    oracle: dict[str, torch.Tensor] = {}
    for entry in manifest["snapshots"]:
        with safe_open(str(buffer_dir / entry["file"]), framework="pt") as handle:
            for key in handle.keys():
                oracle[key] = oracle.get(key, 0) + handle.get_tensor(key).double() / WINDOW
    largest = max(value.abs().max().item() for value in oracle.values())
    error = max((monitor.average.mean()[k].double() - v).abs().max().item() for k, v in oracle.items())
    monitor.close()

    growth = memory[SNAPSHOTS] - memory[1_000]
    per_line = {step: size / step for step, size in history_bytes.items()}
    print(
        f"\nsoak: {SNAPSHOTS} snapshots in {elapsed:.0f}s; most files in buffer/ {most_files} "
        f"(window {WINDOW}); resident memory {memory[1_000] / 2**20:.1f} MiB at step 1000, "
        f"{memory[SNAPSHOTS] / 2**20:.1f} MiB at the end (growth {growth / 2**20:+.1f} MiB); history "
        f"{history_bytes[SNAPSHOTS] / 2**20:.1f} MiB, {per_line[SNAPSHOTS]:.0f} bytes per step at the end "
        f"against {per_line[1_000]:.0f} at step 1000; average error {error / largest:.2e} of the largest "
        "weight"
    )
    assert most_files <= WINDOW + 1
    assert error / largest <= 1e-6
    assert growth < 32 * 2**20  # flat: no per-snapshot leak (a leak of one model copy per step is 150 MiB)
    assert per_line[SNAPSHOTS] == pytest.approx(per_line[1_000], rel=0.1)  # linear
