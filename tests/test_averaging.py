"""WindowAverage against float64 averages of the buffered files, read back with safe_open."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from checkpoint_stability import buffer as buffer_module
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import SnapshotBuffer
from checkpoint_stability.state_dicts import CapturedState


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.norm = torch.nn.BatchNorm1d(32)
        self.out = torch.nn.Linear(32, 50, bias=False)
        self.out.weight = torch.nn.Parameter(torch.randn(50, 32))
        self.tied = torch.nn.Linear(16, 50, bias=False)
        self.tied.weight = self.embed.weight


def drift(model: torch.nn.Module, generator: torch.Generator, step: int) -> None:
    """A random walk with a trend, like weights during training; integer buffers move too."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator) + 0.001)
        model.norm.num_batches_tracked.fill_(step)


def float64_average_of_files(directory, manifest_steps, aliases):
    """The oracle: read every buffered file with safetensors' reader and average in float64."""
    sums: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    for step in manifest_steps:
        with safe_open(str(directory / f"step-{step:08d}.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    sums[key] = sums.get(key, 0) + tensor.to(torch.float64)
                else:
                    newest[key] = tensor
    mean = {k: v / len(manifest_steps) for k, v in sums.items()}
    mean.update(newest)
    for alias, canonical in aliases.items():
        mean[alias] = mean[canonical]
    return mean


def run_window(tmp_path, pushes, window, storage_dtype=None, accumulator=torch.float32, exact_sum_every=None):
    model = SmallNet()
    generator = torch.Generator().manual_seed(1)
    average = WindowAverage(accumulator, exact_sum_every if exact_sum_every is not None else window)
    buffer = SnapshotBuffer(tmp_path, window, storage_dtype=storage_dtype, listener=average.update)
    for step in range(1, pushes + 1):
        drift(model, generator, step)
        buffer.push(step, model.state_dict())
    buffer.close()
    return model, average, buffer


@pytest.mark.slow
def test_thousand_pushes_window_20_match_float64_oracle(tmp_path):
    _, average, buffer = run_window(tmp_path, pushes=1000, window=20)
    assert buffer.steps == list(range(981, 1001))
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    got = average.mean()
    scale = max(v.abs().max().item() for v in oracle.values() if v.is_floating_point())
    worst = max(
        (got[k].double() - oracle[k]).abs().max().item() for k in oracle if oracle[k].is_floating_point()
    )
    assert worst <= 1e-6 * scale, (worst, scale)
    assert torch.equal(got["norm.num_batches_tracked"], torch.tensor(1000))
    assert got["tied.weight"] is got["embed.weight"]
    assert average.count == 20


def test_incremental_without_exact_sums_still_tracks_the_window(tmp_path):
    # exact_sum_every larger than the run: the pure add/subtract path must still be the window mean.
    _, average, buffer = run_window(tmp_path, pushes=60, window=7, exact_sum_every=10_000)
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    got = average.mean()
    for key, value in oracle.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key].double(), value, rtol=0, atol=1e-5)
    assert average.count == 7


def test_bfloat16_storage_averages_exactly_what_is_stored(tmp_path):
    _, average, buffer = run_window(tmp_path, pushes=25, window=6, storage_dtype=torch.bfloat16)
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    got = average.mean(dtype=torch.float64)
    for key, value in oracle.items():
        if value.is_floating_point():
            # float32 sums of bfloat16 values: tiny error only, no bias from the rounding.
            torch.testing.assert_close(got[key], value, rtol=0, atol=2e-6 * value.abs().max().item() + 1e-7)


def test_float64_accumulator(tmp_path):
    _, average, buffer = run_window(
        tmp_path, pushes=30, window=5, accumulator=torch.float64, exact_sum_every=1000
    )
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    got = average.mean(dtype=torch.float64)
    for key, value in oracle.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12)


def test_reset_from_buffer_sources_equals_running_average(tmp_path):
    _, average, _ = run_window(tmp_path, pushes=13, window=4)
    fresh = WindowAverage()
    reopened = SnapshotBuffer(tmp_path, 4)
    fresh.reset(reopened.window_sources(), aliases=reopened.entries[-1].aliases)
    for key, value in average.mean().items():
        torch.testing.assert_close(fresh.mean()[key], value, rtol=0, atol=1e-6)


def test_copy_into_writes_the_mean_into_live_tensors():
    a = CapturedState({"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(1)}, {"v": "w"})
    b = CapturedState({"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(2)}, {"v": "w"})
    average = WindowAverage()
    average.update(a)
    average.update(b)
    targets = {"w": torch.zeros(2, dtype=torch.float16), "v": torch.zeros(2), "n": torch.tensor(0)}
    average.copy_into(targets)
    assert targets["w"].tolist() == [2.0, 4.0] and targets["w"].dtype == torch.float16
    assert targets["v"].tolist() == [2.0, 4.0]
    assert targets["n"].item() == 2


def test_evicting_a_different_model_is_refused():
    average = WindowAverage()
    average.update(CapturedState({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected"):
        average.update(CapturedState({"w": torch.zeros(2), "extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match="shape"):
        average.update(CapturedState({"w": torch.zeros(3)}))


def test_bad_arguments():
    with pytest.raises(ValueError, match="accumulator_dtype"):
        WindowAverage(torch.float16)
    with pytest.raises(ValueError, match="exact_sum_every"):
        WindowAverage(exact_sum_every=0)
    with pytest.raises(RuntimeError, match="no snapshot"):
        WindowAverage().mean()


def test_a_window_file_corrupted_on_disk_does_not_jam_the_window(tmp_path, caplog):
    model = SmallNet()
    generator = torch.Generator().manual_seed(2)
    average = WindowAverage(exact_sum_every=1000)
    buffer = SnapshotBuffer(tmp_path, 3, listener=average.update)
    for step in (1, 2, 3):
        drift(model, generator, step)
        buffer.push(step, model.state_dict())
    buffer.wait()
    target = tmp_path / "step-00000001.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    for step in (4, 5, 6):
        drift(model, generator, step)
        buffer.push(step, model.state_dict())
    buffer.close()
    assert buffer.steps == [4, 5, 6]
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    for key, value in oracle.items():
        if value.is_floating_point():
            torch.testing.assert_close(average.mean()[key].double(), value, rtol=0, atol=1e-6)
    assert "re-summing" in caplog.text


def test_rolling_exact_sum_heals_a_drifted_sum_within_exact_sum_every_updates(tmp_path):
    # Every element is rebuilt exactly from the files at least once per exact_sum_every updates, a slice
    # per update: a sum knocked off by +1 everywhere is healed after `window` pushes, and not after one.
    model = SmallNet()
    generator = torch.Generator().manual_seed(3)
    average = WindowAverage(exact_sum_every=4)
    buffer = SnapshotBuffer(tmp_path, 4, listener=average.update)

    def push(step):
        drift(model, generator, step)
        buffer.push(step, model.state_dict())
        buffer.wait()

    for step in range(1, 7):
        push(step)
    for total in average._sum.values():
        total.add_(1.0)
    push(7)
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    mean = average.mean()
    off = [k for k, v in oracle.items() if v.is_floating_point() and not torch.allclose(mean[k].double(), v)]
    assert off, "one update re-summed everything: the re-sum is not spread over the updates"
    for step in range(8, 11):
        push(step)
    buffer.close()
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    for key, value in oracle.items():
        if value.is_floating_point():
            torch.testing.assert_close(average.mean()[key].double(), value, rtol=0, atol=1e-6)


def test_an_update_reads_about_one_snapshot_of_elements_whatever_the_window(tmp_path):
    # O(P) per update: the rolling re-sum reads P/window elements from each of the window's files.
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(512, 1024) for i in range(8)}  # 4.2M elements, 8 tensors
    elements = sum(t.numel() for t in state.values())
    reads: dict[int, list[int]] = {}
    for window in (2, 8):
        average = WindowAverage(exact_sum_every=window)
        counted: list[int] = []

        def listener(added, evicted, load_window, average=average, counted=counted, window=window):
            def counting_window():
                sources = load_window()
                return [_CountingSource(source, counted) for source in sources]

            counted.clear()
            average.update(added, evicted, counting_window)
            reads.setdefault(window, []).append(sum(counted))

        buffer = SnapshotBuffer(tmp_path / f"w{window}", window, listener=listener)
        for step in range(1, 3 * window + 1):
            for tensor in state.values():
                tensor.add_(0.01)
            buffer.push(step, state)
        buffer.close()
    for window, per_update in reads.items():
        steady = per_update[window:]
        # One slice can overshoot the quota; slices here are 2 rows' worth short of 2M elements.
        assert all(elements * 0.9 <= r <= elements * 1.6 for r in steady), (window, steady, elements)


class _CountingSource:
    def __init__(self, source, counted):
        self.source, self.counted = source, counted

    def __getitem__(self, name):
        return self.source[name]

    def read_rows(self, name, first, last):
        if hasattr(self.source, "read_rows"):
            rows = self.source.read_rows(name, first, last)
        else:  # the snapshot just taken, still in memory
            rows = self.source[name][first:last].reshape(-1)
        self.counted.append(rows.numel())
        return rows


def test_window_files_are_hashed_once_not_at_every_update(tmp_path, monkeypatch):
    checked, read, data_bytes = [], {}, {}
    original_check, original_fill = buffer_module._check_read, buffer_module._fill

    def counting_check(entry, path, size, checksum):
        checked.append(entry.step)
        return original_check(entry, path, size, checksum)

    def counting_fill(handle, view):
        if handle.name not in data_bytes:  # what one pass over the data section reads
            header = int.from_bytes(os.pread(handle.fileno(), 8, 0), "little")
            data_bytes[handle.name] = os.fstat(handle.fileno()).st_size - 8 - header
        got = original_fill(handle, view)
        read[handle.name] = read.get(handle.name, 0) + got
        return got

    monkeypatch.setattr(buffer_module, "_check_read", counting_check)
    monkeypatch.setattr(buffer_module, "_fill", counting_fill)
    _, average, buffer = run_window(tmp_path, pushes=20, window=5)
    # Only the evicted files are read back in full and verified (steps 1..15), each once, and by one
    # read: the one that subtracts them streams every data byte exactly once.
    assert checked == list(range(1, 16))
    assert len(read) == 15
    assert read == data_bytes
    oracle = float64_average_of_files(tmp_path, buffer.steps, buffer.entries[-1].aliases)
    for key, value in oracle.items():
        if value.is_floating_point():
            torch.testing.assert_close(average.mean()[key].double(), value, rtol=0, atol=1e-6)
