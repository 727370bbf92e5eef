"""A process killed (SIGKILL) while a snapshot is written leaves a buffer that reopens cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import blake3
import pytest
import torch
from safetensors import safe_open

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.buffer import SnapshotBuffer
from checkpoint_stability.history import History
from checkpoint_stability.storage.export import load_export

# The child trains nothing: it pushes snapshots of a ~4 MB model through a real monitor and reports
# on stdout which steps the buffer has acknowledged (manifest committed). In the stalled modes it
# freezes at a chosen point of the write path, so the parent's SIGKILL lands exactly there.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from checkpoint_stability import FunctionTask, StabilityMonitor
    from checkpoint_stability import buffer as buffer_module

    run_dir, mode, stall_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_write = buffer_module.atomic_write_bytes

    def stalling_write(path, data, **options):
        step_file = path.name == f"step-{stall_step:08d}.safetensors"
        if mode == "mid-data" and step_file:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            print("stalled", flush=True)
            time.sleep(600)
        if mode == "before-manifest" and path.name == "manifest.json" and stall_step_written[0]:
            print("stalled", flush=True)
            time.sleep(600)
        real_write(path, data, **options)
        if step_file:
            stall_step_written[0] = True

    stall_step_written = [False]
    buffer_module.atomic_write_bytes = stalling_write

    # Exports and the best.json switch: stall once a first best exists, while the next is written.
    from checkpoint_stability import selection as selection_module
    from checkpoint_stability.storage import export as export_module
    real_export_write, real_text_write = export_module.atomic_write_bytes, selection_module.atomic_write_text
    bests = [0]

    def stalling_export_write(path, data, **options):
        if mode == "mid-export" and bests[0] >= 1:
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            print("stalled", flush=True)
            time.sleep(600)
        real_export_write(path, data, **options)

    best_steps = set()

    def stalling_text_write(path, text, **options):
        # best.json is also rewritten for its evidence at every snapshot; stall at a new best's switch.
        new_best = path.name == "best.json" and json.loads(text)["step"] not in best_steps
        if new_best and mode == "before-best" and bests[0] >= 1:
            print("stalled", flush=True)
            time.sleep(600)
        real_text_write(path, text, **options)
        if new_best:
            best_steps.add(json.loads(text)["step"])
            bests[0] += 1

    export_module.atomic_write_bytes = stalling_export_write
    selection_module.atomic_write_text = stalling_text_write
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    x = torch.randn(8, 512)
    task = FunctionTask("t", lambda m: m(x).argmax(-1).tolist(), targets=[0] * 8)
    if mode in ("mid-export", "before-best"):
        # A score that rises with every step, so that every snapshot makes a new best.
        reached = [0]
        rising = lambda m: [0] * min(8, reached[0]) + [1] * (8 - min(8, reached[0]))
        task = FunctionTask("t", rising, targets=[0] * 8)
    monitor = StabilityMonitor([task], dirpath=run_dir, window=3, every_n_steps=1, console=False)
    for step in range(1, 1000):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        if mode in ("mid-export", "before-best"):
            reached[0] = step
        monitor.on_snapshot(model, step)
        print(f"evaluated {step}", flush=True)
        if mode != "random":
            monitor.buffer.wait()
            print(f"acked {step}", flush=True)
    """
)


def run_child(tmp_path, mode: str, stall_step: int = 5, kill_after: float | None = None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode, str(stall_step)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: list[int] = []
    evaluated: list[int] = []
    started = None
    try:
        for line in process.stdout:
            word, _, value = line.strip().partition(" ")
            if word == "acked":
                acked.append(int(value))
            elif word == "evaluated":
                evaluated.append(int(value))
                started = started or time.monotonic()
            if word == "stalled":
                break
            if kill_after is not None and started is not None and time.monotonic() - started >= kill_after:
                break
        else:
            pytest.fail(f"child ended before the kill point (exit {process.wait()})")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    return run_dir, acked, evaluated


def check_consistent(run_dir):
    """The buffer reopens; every manifest entry verifies against its file; nothing is left over."""
    buffer = SnapshotBuffer(run_dir / "buffer", window=3)
    manifest = json.loads((run_dir / "buffer" / "manifest.json").read_text())
    assert [e["step"] for e in manifest["snapshots"]] == buffer.steps
    for entry in manifest["snapshots"]:
        data = (run_dir / "buffer" / entry["file"]).read_bytes()
        assert blake3.blake3(data).hexdigest() == entry["blake3"]
        with safe_open(str(run_dir / "buffer" / entry["file"]), framework="pt") as handle:
            assert set(handle.keys()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    leftovers = sorted(p.name for p in (run_dir / "buffer").iterdir() if p.name != "manifest.json")
    assert leftovers == [e["file"] for e in manifest["snapshots"]]
    buffer.close()
    return buffer.steps


@pytest.mark.parametrize("mode", ["mid-data", "before-manifest"])
def test_kill_during_a_snapshot_write_keeps_the_previous_window(tmp_path, mode):
    run_dir, acked, _ = run_child(tmp_path, mode, stall_step=5)
    assert acked == [1, 2, 3, 4]
    stray = [p.name for p in (run_dir / "buffer").iterdir() if p.name.startswith(".") or "00000005" in p.name]
    assert stray, "the kill must have left a partial write behind for this test to mean anything"
    assert check_consistent(run_dir) == [2, 3, 4]

    # The monitor reopens on it and continues where the acknowledged window ends.
    monitor = StabilityMonitor([], dirpath=run_dir, window=3, every_n_steps=1, console=False)
    monitor.open(resume_step=4)
    assert monitor.buffer.steps == [2, 3, 4]
    assert monitor.average.count == 3
    monitor.close()


@pytest.mark.parametrize("mode", ["mid-export", "before-best"])
def test_kill_while_a_new_best_is_exported_keeps_the_previous_best(tmp_path, mode):
    run_dir, _, evaluated = run_child(tmp_path, mode)
    before = json.loads((run_dir / "best.json").read_text())
    exports = sorted(p.name for p in (run_dir / "exports").iterdir())
    assert len(exports) >= 2, "the kill must land while a second export exists for this test to mean anything"
    # Reopened: best.json still names the previous, complete export; the half-written one is gone.
    monitor = StabilityMonitor([], dirpath=run_dir, window=3, every_n_steps=1, console=False)
    monitor.open(resume_step=evaluated[-1])
    assert monitor.best == before
    assert set(load_export(monitor.best_model_path)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert [p.name for p in (run_dir / "exports").iterdir()] == [monitor.best_model_path.name]
    monitor.close()


def kill_at_random_moments(tmp_path, trials: int, seed: int) -> dict:
    """Kill a child run at random moments ``trials`` times; check everything after each; count."""
    rng = random.Random(seed)
    seen = {"trials": 0, "snapshots kept": 0, "history lines": 0, "with a best export": 0}
    for trial in range(trials):
        trial_dir = tmp_path / f"trial{trial}"
        trial_dir.mkdir()
        run_dir, _, evaluated = run_child(trial_dir, "random", kill_after=rng.uniform(0.2, 1.5))
        steps = check_consistent(run_dir)
        assert steps == sorted(steps) and len(steps) <= 3
        if steps:
            # Acknowledged snapshots are consecutive and no newer than what the child reached.
            assert steps == list(range(steps[0], steps[-1] + 1))
            assert steps[-1] <= (evaluated[-1] + 1 if evaluated else 1)
        # The history parses (a torn last line is dropped), holds each step once, and only steps the
        # child got to: the one being evaluated when killed at most.
        history = History(run_dir)
        keys = [(r["step"], r["task"], r["variant"]) for r in history.records()]
        assert len(keys) == len(set(keys))
        recorded = sorted({r["step"] for r in history.records()})
        assert recorded == list(range(1, len(recorded) + 1))
        assert not recorded or recorded[-1] <= (evaluated[-1] + 1 if evaluated else 1)
        # The reopened monitor's average is the float64 mean of the files that survived.
        monitor = StabilityMonitor([], dirpath=run_dir, window=3, every_n_steps=1, console=False)
        monitor.open(resume_step=max([*steps, *recorded], default=0))  # reopened as a resume: keeps all
        if steps:
            oracle = {}
            for step in steps:
                path = run_dir / "buffer" / f"step-{step:08d}.safetensors"
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        oracle[key] = oracle.get(key, 0) + handle.get_tensor(key).double() / len(steps)
            for key, value in monitor.average.mean().items():
                torch.testing.assert_close(value.double(), oracle[key], rtol=0, atol=1e-6)
        # best.json names a complete export (the old best or the new one), and it is the only one left.
        if monitor.best is not None:
            exported = load_export(monitor.best_model_path)
            assert set(exported) == {"0.weight", "0.bias", "1.weight", "1.bias"}
            assert [p.name for p in (run_dir / "exports").iterdir()] == [monitor.best_model_path.name]
            seen["with a best export"] += 1
        monitor.close()
        seen["trials"] += 1
        seen["snapshots kept"] += len(steps)
        seen["history lines"] += len(keys)
    return seen


def test_kill_at_random_moments(tmp_path):
    seen = kill_at_random_moments(tmp_path, trials=3, seed=1234)
    assert seen["trials"] == 3


@pytest.mark.soak
def test_soak_kill_at_random_moments(tmp_path):
    seen = kill_at_random_moments(tmp_path, trials=24, seed=2026)
    print(f"\nkill -9 soak: {seen}")
    assert seen["trials"] == 24 and seen["with a best export"] > 0
