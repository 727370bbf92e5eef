"""The per-snapshot path of issue 19: the disk budget at the first snapshot, manifests of the previous
checksum (SHA-256) still read, the evicted file verified by the read that subtracts it, and a second
snapshot image that lets a push overlap the previous write."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import namedtuple

import blake3
import pytest
import torch
from safetensors import safe_open
from tiny_training import classify_task, make_data, train

from checkpoint_stability import StabilityMonitor
from checkpoint_stability import buffer as buffer_module
from checkpoint_stability import window as window_module
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import SnapshotBuffer, snapshot_file_name
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.window import InsufficientDiskError, SnapshotWindow

DiskUsage = namedtuple("DiskUsage", "total used free")


def float64_mean_of_files(directory, steps):
    sums = {}
    for step in steps:
        with safe_open(str(directory / f"step-{step:08d}.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                sums[key] = sums.get(key, 0) + handle.get_tensor(key).double()
    return {key: value / len(steps) for key, value in sums.items()}


def test_a_disk_too_small_for_the_buffer_is_reported_with_its_figures(tmp_path, monkeypatch, caplog):
    model = torch.nn.Linear(100, 100)  # 40,400 bytes of float32 weights
    monkeypatch.setattr(window_module.shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 100_000))
    window = SnapshotWindow(StabilityConfig(window=4), FaultPolicy("warn", Runtime))
    window.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert window.push(1, model.state_dict()) is not None  # reported, and the run goes on
    window.close()
    assert window.steps == [1]
    snapshot = (tmp_path / "step-00000001.safetensors").stat().st_size
    needed = 5 * snapshot + 40_400  # window 4 + 1 being written, + an export in float32
    (warning,) = [r.getMessage() for r in caplog.records if "snapshot buffer needs" in r.getMessage()]
    assert f"needs up to {needed / 1e6:.1f} MB" in warning
    assert "0.1 MB free" in warning and "storage_dtype='bfloat16'" in warning
    assert f"each snapshot: {snapshot / 1e6:.1f} MB" in window.storage_note
    assert "the window sum adds 0.0 MB" in window.storage_note  # 10,100 float32 elements: 40,400 bytes

    # Enough space: nothing reported, the note says what is available.
    caplog.clear()
    monkeypatch.setattr(window_module.shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 10**9))
    roomy = SnapshotWindow(StabilityConfig(window=4), FaultPolicy("warn", Runtime))
    roomy.open(tmp_path / "roomy")
    with caplog.at_level(logging.WARNING):
        roomy.push(1, model.state_dict())
        roomy.push(2, model.state_dict())
    roomy.close()
    assert not [r for r in caplog.records if "snapshot buffer needs" in r.getMessage()]
    assert "1.00 GB available" in roomy.storage_note

    strict = SnapshotWindow(StabilityConfig(window=4, on_error="raise"), FaultPolicy("raise", Runtime))
    monkeypatch.setattr(window_module.shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 1))
    strict.open(tmp_path / "strict")
    with pytest.raises(InsufficientDiskError, match="lower `window`"):
        strict.push(1, model.state_dict())
    strict.release()


def test_buffers_written_with_sha256_checksums_are_still_verified_and_evicted(tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    buffer = SnapshotBuffer(tmp_path, window=3)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(0.1)
        buffer.push(step, model.state_dict())
    buffer.close()
    # The manifest as an earlier release wrote it: a "sha256" per entry.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["snapshots"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
    manifest["snapshots"][1]["sha256"] = "0" * 64  # and one that no longer matches its file
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    average = WindowAverage(exact_sum_every=1000)
    with caplog.at_level(logging.WARNING):
        reopened = SnapshotBuffer(tmp_path, window=3, listener=average.update)
    assert reopened.steps == [1, 3]
    assert any("sha256 checksum does not match" in r.getMessage() for r in caplog.records)
    average.reset(reopened.window_sources())
    for step in (4, 5, 6):
        with torch.no_grad():
            model.weight.add_(0.1)
        reopened.push(step, model.state_dict())
    reopened.close()
    assert reopened.steps == [4, 5, 6]
    entries = json.loads((tmp_path / "manifest.json").read_text())["snapshots"]
    for entry in entries:
        assert entry["blake3"] == blake3.blake3((tmp_path / entry["file"]).read_bytes()).hexdigest()
        assert "sha256" not in entry
    oracle = float64_mean_of_files(tmp_path, [4, 5, 6])
    for key, value in oracle.items():
        torch.testing.assert_close(average.mean()[key].double(), value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("where", ["first data byte", "middle", "last byte"])
def test_a_corrupt_evicted_file_is_caught_by_the_read_that_subtracts_it(tmp_path, where, caplog):
    """The evicted file is subtracted as it is read and verified only at its end: a flipped byte anywhere
    is caught, and the window is re-summed from its files (the subtraction undone)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    average = WindowAverage(exact_sum_every=1000)
    buffer = SnapshotBuffer(tmp_path, 2, listener=average.update)
    for step in (1, 2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        buffer.push(step, model.state_dict())
    buffer.wait()
    target = tmp_path / "step-00000001.safetensors"
    data = bytearray(target.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    index = {"first data byte": start, "middle": (start + len(data)) // 2, "last byte": len(data) - 1}[where]
    data[index] ^= 0x40
    target.write_bytes(bytes(data))
    with torch.no_grad():
        model[0].weight.mul_(2)
    with caplog.at_level(logging.WARNING):
        buffer.push(3, model.state_dict())
        buffer.close()
    assert buffer.steps == [2, 3]
    assert "re-summing" in caplog.text and "checksum does not match" in caplog.text
    oracle = float64_mean_of_files(tmp_path, [2, 3])
    for key, value in oracle.items():
        torch.testing.assert_close(average.mean()[key].double(), value, rtol=0, atol=1e-6)


def test_two_snapshot_images_let_a_push_return_while_the_previous_write_is_held(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real_write = buffer_module.atomic_write_bytes

    def held_write(path, data, **options):
        if path.name == snapshot_file_name(1):
            started.set()
            assert release.wait(20)
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", held_write)
    model = torch.nn.Linear(16, 16)
    weights = {}
    buffer = SnapshotBuffer(tmp_path, window=2, images=2)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.detach().clone()
        buffer.push(step, model.state_dict())  # the second returns with the first write still held
    assert started.wait(20) and buffer.steps == []
    third = threading.Thread(target=buffer.push, args=(3, {"weight": model.weight * 3, "bias": model.bias}))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third push must wait for the first write: both images are in use"
    release.set()
    third.join(20)
    buffer.close()
    assert buffer.steps == [2, 3]
    # Each file holds its own step's weights: the second copy did not go into the image being written.
    with safe_open(str(tmp_path / snapshot_file_name(2)), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("weight"), weights[2])
    with pytest.raises(ValueError, match="images must be 1 or 2"):
        SnapshotBuffer(tmp_path / "other", window=2, images=3)


def test_a_window_with_two_images_averages_and_measures_drift_as_with_one(tmp_path):
    def run(images):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
        window = SnapshotWindow(
            StabilityConfig(window=3, snapshot_images=images), FaultPolicy("raise", Runtime)
        )
        window.open(tmp_path / f"images-{images}")
        for step in range(1, 8):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.1)
            window.push(step, model.state_dict())  # no wait between pushes
        window.wait()
        drifts = {step: window.drift_of(step) for step in range(1, 8)}
        mean = window.average.mean()
        note = window.storage_note
        window.close()
        return window.steps, mean, drifts, note

    steps_one, mean_one, drifts_one, _ = run(1)
    steps_two, mean_two, drifts_two, note = run(2)
    assert steps_one == steps_two == [5, 6, 7]
    oracle = float64_mean_of_files(tmp_path / "images-2", [5, 6, 7])
    for key, value in oracle.items():
        torch.testing.assert_close(mean_two[key].double(), value, rtol=0, atol=1e-6)
        assert torch.equal(mean_one[key], mean_two[key])
    assert drifts_two == drifts_one and all(d is not None and d.step == s for s, d in drifts_two.items())
    assert "snapshot_images=2: two copies" in note and "+ 2 being written" in note
    with pytest.raises(ValueError, match="snapshot_images must be 1 or 2"):
        StabilityConfig(snapshot_images=3)


def test_a_monitor_with_two_images_writes_the_same_history_and_drift(tmp_path):
    """Through the whole monitor (tasks, selection, export): snapshot_images=2 changes when writes finish,
    not what is recorded."""

    def run(images):
        x, y = make_data(5)
        monitor = StabilityMonitor(
            [classify_task(x, y)],
            dirpath=tmp_path / f"images-{images}",
            window=3,
            every_n_steps=5,
            console=False,
            tensorboard=False,
            snapshot_images=images,
        )
        train(40, monitor)
        monitor.close()
        history = [json.loads(line) for line in (monitor.dirpath / "history.jsonl").read_text().splitlines()]
        drift = [json.loads(line) for line in (monitor.dirpath / "drift.jsonl").read_text().splitlines()]
        for record in history + drift:
            record.pop("time", None)
        return history, drift, json.loads((monitor.dirpath / "best.json").read_text())["step"]

    one, two = run(1), run(2)
    assert len(one[1]) == 8  # a drift line per snapshot
    assert two == one
