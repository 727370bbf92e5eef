"""The per-snapshot path of issue 19: the disk budget at the first snapshot, manifests of the previous
checksum (SHA-256) still read, and the evicted file verified by the read that subtracts it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import namedtuple

import blake3
import pytest
import torch
from safetensors import safe_open

from checkpoint_stability import window as window_module
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import SnapshotBuffer
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
