"""SnapshotBuffer: files read back with safetensors' own reader, checksums with the reference blake3."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import tempfile
import threading
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open

from checkpoint_stability import buffer as buffer_module
from checkpoint_stability.buffer import SnapshotBuffer, SnapshotError, snapshot_file_name
from checkpoint_stability.state_dicts import capture_state, live_tensors, write_into


class TiedModel(torch.nn.Module):
    """GPT-2's shape in miniature: the output projection shares the embedding matrix."""

    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def states_at(model: torch.nn.Module, steps):
    """Yield (step, independent float64-free copy) while perturbing the weights between steps."""
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
            model.norm.num_batches_tracked.fill_(step)
        yield step, {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_file(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_window_files_manifest_and_checksums(tmp_path):
    model = TiedModel()
    buffer = SnapshotBuffer(tmp_path, window=3)
    expected = {}
    for step, state in states_at(model, [10, 20, 30, 40, 50]):
        buffer.push(step, model.state_dict())
        expected[step] = state
    buffer.close()

    assert buffer.steps == [30, 40, 50]
    on_disk = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert on_disk == [snapshot_file_name(s) for s in (30, 40, 50)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["step"] for e in manifest["snapshots"]] == [30, 40, 50]
    for entry in manifest["snapshots"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["blake3"] == blake3.blake3(data).hexdigest()
        assert entry["bytes"] == len(data)
        tensors, metadata = read_file(tmp_path / entry["file"])
        # The tie is stored once: only the embedding, the head is an alias.
        assert "head.weight" not in tensors
        assert entry["aliases"] == {"head.weight": "embed.weight"}
        assert json.loads(metadata["aliases"]) == {"head.weight": "embed.weight"}
        for key, value in expected[entry["step"]].items():
            stored = tensors[entry["aliases"].get(key, key)]
            assert torch.equal(stored, value), (entry["step"], key)


def test_load_restores_the_tie_and_writes_back_into_a_fresh_model(tmp_path):
    source = TiedModel()
    buffer = SnapshotBuffer(tmp_path, window=2)
    buffer.push(5, source.state_dict())
    buffer.wait()
    loaded = buffer.load(5)
    full = loaded.full()
    assert full["head.weight"] is full["embed.weight"]
    target = TiedModel()
    write_into(live_tensors(target), loaded)
    assert target.head.weight is target.embed.weight
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    buffer.close()


def test_capture_is_a_copy_not_a_view():
    model = torch.nn.Linear(3, 3)
    captured = capture_state(live_tensors(model))
    before = captured.tensors["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(captured.tensors["weight"], before)
    assert (
        captured.tensors["weight"].untyped_storage().data_ptr() != model.weight.untyped_storage().data_ptr()
    )


def test_non_contiguous_tensor_is_stored(tmp_path):
    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())

    model = Transposed()
    assert not model.t.is_contiguous()
    buffer = SnapshotBuffer(tmp_path, window=1)
    buffer.push(1, model.state_dict())
    buffer.close()
    tensors, _ = read_file(tmp_path / snapshot_file_name(1))
    assert torch.equal(tensors["t"], model.t)


def test_storage_dtype_bfloat16_stores_rounded_floats_only(tmp_path):
    model = TiedModel()
    buffer = SnapshotBuffer(tmp_path, window=2, storage_dtype=torch.bfloat16)
    buffer.push(1, model.state_dict())
    buffer.close()
    tensors, _ = read_file(tmp_path / snapshot_file_name(1))
    assert tensors["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed.weight"], model.embed.weight.detach().to(torch.bfloat16))
    assert tensors["norm.num_batches_tracked"].dtype == torch.int64


def test_write_happens_off_the_calling_thread_and_next_push_waits(tmp_path, monkeypatch):
    release = threading.Event()
    started = threading.Event()
    real_write = buffer_module.atomic_write_bytes

    def slow_write(path, data, **options):
        if path.name.startswith("step-"):
            started.set()
            assert release.wait(10)
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", slow_write)
    buffer = SnapshotBuffer(tmp_path, window=3)
    model = torch.nn.Linear(4, 4)
    buffer.push(1, model.state_dict())  # returns while the write is held
    assert started.wait(10)
    assert buffer.steps == []
    assert not (tmp_path / snapshot_file_name(1)).exists()

    second = threading.Thread(target=buffer.push, args=(2, model.state_dict()))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the next push must wait for the write in flight"
    release.set()
    second.join(10)
    buffer.close()
    assert buffer.steps == [1, 2]


def test_write_failure_leaves_the_window_unchanged(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    buffer = SnapshotBuffer(tmp_path, window=2)
    buffer.push(1, model.state_dict())
    buffer.push(2, model.state_dict())
    buffer.wait()
    real_write = buffer_module.atomic_write_bytes

    def disk_full(path, data, **options):
        if path.name == snapshot_file_name(3):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", disk_full)
    buffer.push(3, model.state_dict())
    with pytest.raises(SnapshotError, match="No space left") as caught:
        buffer.wait()
    assert caught.value.step == 3
    assert buffer.steps == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", snapshot_file_name(1), snapshot_file_name(2)]
    )
    monkeypatch.setattr(buffer_module, "atomic_write_bytes", real_write)
    buffer.push(4, model.state_dict())
    buffer.close()
    assert buffer.steps == [2, 4]


def test_manifest_failure_removes_the_uncommitted_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    buffer = SnapshotBuffer(tmp_path, window=2)
    buffer.push(1, model.state_dict())
    buffer.wait()
    real_write = buffer_module.atomic_write_bytes

    def manifest_fails(path, data, **options):
        if path.name == "manifest.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", manifest_fails)
    buffer.push(2, model.state_dict())
    with pytest.raises(SnapshotError, match="Permission denied"):
        buffer.wait()
    assert not (tmp_path / snapshot_file_name(2)).exists()
    assert buffer.steps == [1]
    buffer.close()
    assert SnapshotBuffer(tmp_path, window=2).steps == [1]


def test_reopen_drops_bad_files_with_one_warning_each(tmp_path, caplog):
    model = torch.nn.Linear(8, 8)
    buffer = SnapshotBuffer(tmp_path, window=5)
    for step in (1, 2, 3, 4, 5):
        buffer.push(step, model.state_dict())
    buffer.close()
    flipped = tmp_path / snapshot_file_name(2)
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / snapshot_file_name(3)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (tmp_path / snapshot_file_name(4)).unlink()
    (tmp_path / ".step-00000009.safetensors.tmp-123").write_bytes(b"partial")
    (tmp_path / snapshot_file_name(7)).write_bytes(b"never committed")

    with caplog.at_level(logging.INFO, logger="checkpoint_stability.buffer"):
        reopened = SnapshotBuffer(tmp_path, window=5)
    assert reopened.steps == [1, 5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert any(snapshot_file_name(2) in w and "checksum does not match" in w for w in warnings)
    assert any(snapshot_file_name(3) in w and "truncated" in w for w in warnings)
    assert any(snapshot_file_name(4) in w and "missing" in w for w in warnings)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["manifest.json", snapshot_file_name(1), snapshot_file_name(5)])
    assert [e["step"] for e in json.loads((tmp_path / "manifest.json").read_text())["snapshots"]] == [1, 5]


@pytest.mark.parametrize(
    "bad_name",
    ["../outside.safetensors", "/tmp/outside.safetensors", "sub/step-00000001.safetensors", "x.bin"],
)
def test_manifest_names_outside_the_buffer_are_refused(tmp_path, bad_name, caplog):
    buffer_dir = tmp_path / "buffer"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"precious")
    buffer = SnapshotBuffer(buffer_dir, window=2)
    buffer.push(1, torch.nn.Linear(2, 2).state_dict())
    buffer.close()
    manifest = json.loads((buffer_dir / "manifest.json").read_text())
    manifest["snapshots"][0]["file"] = bad_name
    manifest["snapshots"][0]["blake3"] = blake3.blake3(b"precious").hexdigest()
    (buffer_dir / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        reopened = SnapshotBuffer(buffer_dir, window=2)
    assert reopened.steps == []
    assert outside.read_bytes() == b"precious"
    assert any(bad_name in r.getMessage() for r in caplog.records)


def test_symlinked_snapshot_is_refused(tmp_path, caplog):
    buffer = SnapshotBuffer(tmp_path / "buffer", window=2)
    buffer.push(1, torch.nn.Linear(2, 2).state_dict())
    buffer.close()
    real = tmp_path / "buffer" / snapshot_file_name(1)
    elsewhere = tmp_path / "elsewhere.safetensors"
    real.rename(elsewhere)
    real.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING):
        reopened = SnapshotBuffer(tmp_path / "buffer", window=2)
    assert reopened.steps == []
    assert elsewhere.exists(), "a file outside the buffer is never deleted"
    assert any("symlink" in r.getMessage() for r in caplog.records)


def test_unreadable_manifest_starts_empty_with_a_warning(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        buffer = SnapshotBuffer(tmp_path, window=2)
    assert buffer.steps == []
    assert any("manifest" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_truncate_after_and_steps_must_increase(tmp_path):
    model = torch.nn.Linear(2, 2)
    buffer = SnapshotBuffer(tmp_path, window=4)
    for step in (10, 20, 30, 40):
        buffer.push(step, model.state_dict())
    assert buffer.truncate_after(25) == [30, 40]
    assert buffer.steps == [10, 20]
    assert not (tmp_path / snapshot_file_name(30)).exists()
    with pytest.raises(ValueError, match="not newer"):
        buffer.push(20, model.state_dict())
    buffer.push(30, model.state_dict())
    buffer.close()
    assert SnapshotBuffer(tmp_path, window=4).steps == [10, 20, 30]


def test_reopen_with_a_smaller_window_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(2, 2)
    buffer = SnapshotBuffer(tmp_path, window=4)
    for step in (1, 2, 3, 4):
        buffer.push(step, model.state_dict())
    buffer.close()
    smaller = SnapshotBuffer(tmp_path, window=2)
    assert smaller.steps == [3, 4]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        snapshot_file_name(3),
        snapshot_file_name(4),
    ]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="window"):
        SnapshotBuffer(tmp_path, window=0)
    buffer = SnapshotBuffer(tmp_path, window=1)
    with pytest.raises(ValueError, match="step"):
        buffer.push(-1, {})
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="meta"):
        buffer.push(1, meta.state_dict())


def test_serialized_snapshot_reads_back_with_safetensors_own_readers():
    from safetensors.torch import load

    tensors = {
        "b_f32": torch.randn(3, 5),
        "a_bf16": torch.randn(7).to(torch.bfloat16),
        "half": torch.randn(2, 2).to(torch.float16),
        "double": torch.randn(3, dtype=torch.float64),
        "count": torch.tensor(41, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "small": torch.arange(3, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
    }
    data = buffer_module.serialize_safetensors(tensors, {"step": "7", "aliases": "{}"})
    back = load(bytes(data))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with open_bytes(bytes(data)) as path, safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"step": "7", "aliases": "{}"}


@contextlib.contextmanager
def open_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "file.safetensors"
        path.write_bytes(data)
        yield path


def test_snapshots_copied_into_the_reused_file_image_read_back_exactly(tmp_path):
    from safetensors.torch import load_file

    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.BatchNorm1d(4))
    buffer = SnapshotBuffer(tmp_path, window=3, storage_dtype=torch.bfloat16)
    expected = {}
    # Steps of growing length move the header's end; the data must not move with it.
    for step in (1, 10, 123456789, 10**12):
        with torch.no_grad():
            model[0].weight.add_(0.5)
        model[1].num_batches_tracked += 1
        buffer.push(step, model.state_dict())
        buffer.wait()
        expected[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        back = load_file(str(tmp_path / snapshot_file_name(step)))
        assert set(back) == set(expected[step])
        for name, value in expected[step].items():
            stored = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert torch.equal(back[name], stored), (step, name)
        with safe_open(str(tmp_path / snapshot_file_name(step)), framework="pt") as handle:
            assert handle.metadata()["step"] == str(step)
    buffer.close()
    assert buffer.steps == [10, 123456789, 10**12]


def test_every_dtype_and_layout_is_copied_into_the_image_exactly(tmp_path):
    """Small tensors go into the image by numpy's memcpy (bfloat16 as int16), large ones by torch's
    copy_; both, strided sources and parameters that require grad read back bit for bit."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(3)
    large = buffer_module._MEMCPY_MAX_BYTES // 4 + 1  # float32 elements: just past the memcpy bound
    buffer = SnapshotBuffer(tmp_path, window=2)
    for step in (1, 2):
        tensors = {
            "large_f32": torch.randn(large, generator=generator),
            "f32_param": torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
            "transposed": torch.randn(4, 6, generator=generator).t(),
            "bf16": torch.randn(9, generator=generator).bfloat16(),
            "large_bf16": torch.randn(large, generator=generator).bfloat16(),
            "half": torch.randn(2, 2, generator=generator).half(),
            "double": torch.randn(3, generator=generator, dtype=torch.float64),
            "count": torch.tensor(40 + step),
            "mask": torch.rand(5, generator=generator) > 0.5,
            "bytes": torch.randint(0, 255, (6,), generator=generator, dtype=torch.uint8),
            "int8": torch.randint(-100, 100, (6,), generator=generator, dtype=torch.int8),
        }
        buffer.push(step, tensors)
        buffer.wait()
        back = load_file(str(tmp_path / snapshot_file_name(step)))
        assert set(back) == set(tensors)
        for name, tensor in tensors.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor.detach()), (step, name)
    buffer.close()
