"""Weight drift at each snapshot, against float64 norms of the buffered files read back with safe_open.

The window runs for real (buffer, writer thread, average); the oracle reads what is on disk: the
previous snapshot's file as it was written (kept aside while it was still in the buffer) and the
window's files after each snapshot, and computes both norms in float64 over the files' floating
tensors (a file holds a tied tensor once, so the oracle counts it once too).
"""

from __future__ import annotations

import errno
import logging
import math

import pytest
import torch
from safetensors import safe_open

import checkpoint_stability.buffer as buffer_module
from checkpoint_stability import StabilityMonitor
from checkpoint_stability.averaging import DriftSums, WindowAverage
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.diagnostics import WeightDrift
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.state_dicts import CapturedState
from checkpoint_stability.window import SnapshotWindow

RTOL = 1e-6


class TiedNet(torch.nn.Module):
    """An embedding tied to the output layer (two names, one tensor), a floating buffer and an integer one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 12)
        self.hidden = torch.nn.Linear(12, 24)
        self.head = torch.nn.Linear(12, 40, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("running", torch.zeros(24))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))


def move(model: torch.nn.Module, generator: torch.Generator, step: int) -> None:
    """Every floating tensor moves by a random amount of known size; the integer buffer counts steps."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
        model.seen.fill_(step * 1000)  # huge and changing: counted, it would swamp both norms


def read_file(directory, step: int) -> dict[str, torch.Tensor]:
    """The floating tensors of a buffered snapshot, as stored, widened to float64."""
    with safe_open(str(directory / f"step-{step:08d}.safetensors"), framework="pt") as handle:
        return {
            key: handle.get_tensor(key).to(torch.float64)
            for key in handle.keys()
            if handle.get_tensor(key).is_floating_point()
        }


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(math.fsum(float(t.square().sum()) for t in tensors.values()))


def oracle(directory, current: dict, previous: dict | None, window_steps: list[int]) -> tuple:
    """(previous, average) relative drifts in float64 from the files, over the tensors of ``current``."""
    mean = {key: torch.zeros_like(value) for key, value in current.items()}
    for step in window_steps:
        stored = read_file(directory, step)
        for key in mean:
            mean[key] += stored[key] / len(window_steps)
    size = norm(current)
    average = norm({key: current[key] - mean[key] for key in current}) / size
    if previous is None:
        return None, average
    assert previous.keys() == current.keys()
    return norm({key: current[key] - previous[key] for key in current}) / size, average


def make_window(config: StabilityConfig, on_error: str = "raise") -> SnapshotWindow:
    return SnapshotWindow(config, FaultPolicy(on_error, Runtime))


def run(tmp_path, steps=range(1, 7), **settings):
    """Push a moving TiedNet through a real window; returns [(step, drift, oracle)] and the window."""
    config = StabilityConfig(**settings)
    window = make_window(config)
    model = TiedNet()
    generator = torch.Generator().manual_seed(3)
    window.open(tmp_path)
    measured, stored = [], {}
    try:
        for step in steps:
            move(model, generator, step)
            window.push(step, model.state_dict())
            window.wait()
            stored[step] = read_file(tmp_path, step)
            earlier = [s for s in stored if s < step]
            previous = stored[earlier[-1]] if earlier else None
            measured.append(
                (step, window.drift_of(step), oracle(tmp_path, stored[step], previous, window.steps))
            )
    finally:
        window.release()
    return measured, window


@pytest.mark.parametrize(
    "settings",
    [
        {"window": 3},
        {"window": 3, "storage_dtype": "bfloat16"},
        {"window": 1},  # the previous snapshot is the one leaving the window
        {"window": 3, "accumulator_dtype": "float64"},
    ],
    ids=["float32", "bfloat16", "window-1", "float64-accumulator"],
)
def test_drift_matches_float64_norms_of_the_buffered_files(tmp_path, settings):
    measured, _ = run(tmp_path, **settings)
    assert len(measured) == 6
    for index, (step, drift, (previous, average)) in enumerate(measured):
        assert isinstance(drift, WeightDrift), step
        assert drift.step == step
        assert drift.n_models == min(index + 1, settings["window"])
        got_previous, got_average = drift.relative()
        if index == 0:
            assert drift.previous_step is None and got_previous is None
            assert got_average == 0.0  # the window holds only this snapshot
            continue
        assert drift.previous_step == step - 1
        assert got_previous == pytest.approx(previous, rel=RTOL)
        if settings["window"] == 1:
            assert got_average == 0.0
        else:
            assert got_average == pytest.approx(average, rel=RTOL)
            assert got_average > 0.01  # the comparison is not between two zeros


def test_the_tied_tensor_counts_once_and_integer_buffers_not_at_all(tmp_path):
    measured, _ = run(tmp_path, steps=[1, 2], window=3)
    _, drift, _ = measured[1]
    # By hand from the files: the oracle's keys are the file's, which hold the tied weight once.
    current, previous = read_file(tmp_path, 2), read_file(tmp_path, 1)
    assert "head.weight" not in current and "embed.weight" in current and "seen" not in current
    assert drift.current_sq == pytest.approx(norm(current) ** 2, rel=RTOL)
    assert drift.previous_sq == pytest.approx(
        norm({key: current[key] - previous[key] for key in current}) ** 2, rel=RTOL
    )
    doubled = norm(current) ** 2 + float(current["embed.weight"].square().sum())
    assert drift.current_sq != pytest.approx(doubled, rel=1e-3)


def test_drift_off_computes_nothing(tmp_path, monkeypatch):
    calls = []
    real = WindowAverage.drift_sums

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WindowAverage, "drift_sums", counted)
    measured, window = run(tmp_path, steps=range(1, 5), window=3, drift=False)
    assert [drift for _, drift, _ in measured] == [None] * 4
    assert calls == []
    assert window.steps == [2, 3, 4]  # the window itself ran as usual


def test_monitor_window_measures_drift(tmp_path):
    model = TiedNet()
    generator = torch.Generator().manual_seed(5)
    monitor = StabilityMonitor(
        [], dirpath=tmp_path, window=3, every_n_steps=1, console=False, report=False, tensorboard=False
    )
    stored = {}
    try:
        for step in range(1, 6):
            move(model, generator, step)
            monitor.on_snapshot(model, step)
            monitor.window.wait()
            stored[step] = read_file(tmp_path / "buffer", step)
            drift = monitor.window.drift_of(step)
            previous, average = oracle(
                tmp_path / "buffer", stored[step], stored.get(step - 1), monitor.window.steps
            )
            got_previous, got_average = drift.relative()
            assert got_previous == (None if previous is None else pytest.approx(previous, rel=RTOL))
            assert got_average == pytest.approx(average, rel=RTOL, abs=0 if step > 1 else 1e-12)
    finally:
        monitor.close()


def test_a_restarted_window_has_no_previous_snapshot(tmp_path):
    window = make_window(StabilityConfig(window=3), on_error="warn")
    window.open(tmp_path)
    try:
        small, large = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
        for step, model in ((1, small), (2, small), (3, large), (4, large)):
            window.push(step, model.state_dict())
            window.wait()
        assert window.steps == [3, 4]
        assert window.drift_of(2).previous_step == 1
        restarted = window.drift_of(3)
        assert restarted.previous_step is None and restarted.relative() == (None, 0.0)
        assert window.drift_of(4).previous_step == 3
    finally:
        window.release()


def test_rejected_and_failed_snapshots_have_no_drift(tmp_path, monkeypatch):
    window = make_window(StabilityConfig(window=3), on_error="warn")
    model = torch.nn.Linear(4, 4)
    window.parameter_names = {"weight", "bias"}
    window.open(tmp_path)
    real_write = buffer_module.atomic_write_bytes

    def manifest_full_at_step_3(path, data, **options):
        # The manifest is written after the listener measured the drift: the commit still fails.
        if path.name == "manifest.json" and b"step-00000003" in bytes(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", manifest_full_at_step_3)
    try:
        for step in (1, 2, 3, 4, 5):
            with torch.no_grad():
                model.weight.add_(1.0)
                if step == 4:
                    model.weight[0, 0] = float("nan")
                if step == 5:
                    model.weight[0, 0] = 1.0
            window.push(step, model.state_dict())
            window.wait()
        assert window.steps == [1, 2, 5]
        assert window.drift_of(3) is None  # its manifest write failed
        assert window.drift_of(4) is None  # NaN weights: kept out of the window
        assert window.drift_of(5).previous_step == 2  # the newest snapshot the window holds
    finally:
        window.release()


def test_once_the_window_is_full_the_drift_is_measured_in_the_pass_that_subtracts(tmp_path, monkeypatch):
    """Steps 4-6 evict a snapshot each: their drift comes from the update's own pass over the evicted
    file (and matches float64 in the test above); only the first three are measured by a pass of their own."""
    apart = []
    original = WindowAverage.drift_sums

    def counting(self, current, previous=None):
        apart.append(self.count)
        return original(self, current, previous)

    monkeypatch.setattr(WindowAverage, "drift_sums", counting)
    measured, _ = run(tmp_path, window=3)
    assert apart == [1, 2, 3]
    assert all(isinstance(drift, WeightDrift) for _, drift, _ in measured)


def test_a_failure_measuring_drift_keeps_the_snapshot_and_warns_once(tmp_path, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("drift exploded")

    # Both ways of measuring (apart, and fused into the update that subtracts the evicted file) add
    # their pieces through DriftSums.
    monkeypatch.setattr(DriftSums, "add", broken)
    with caplog.at_level(logging.WARNING, logger="checkpoint_stability.window"):
        measured, window = run(tmp_path, steps=range(1, 5), window=3)
    assert [drift for _, drift, _ in measured] == [None] * 4
    assert window.steps == [2, 3, 4]
    warnings = [r for r in caplog.records if "weight drift" in r.getMessage()]
    assert len(warnings) == 1 and "drift exploded" in warnings[0].getMessage()


def test_only_the_last_few_drifts_are_kept(tmp_path):
    _, window = run(tmp_path, steps=range(1, 13), window=2)
    kept = [step for step in range(1, 13) if window.drift_of(step) is not None]
    assert kept == list(range(5, 13))


# ---------------------------------------------------------------- shards and the dataclass


def test_shards_combine_into_the_whole_models_drift():
    """Two ranks' shards (halves of every tensor, each rank its own average) add up to the whole model."""
    generator = torch.Generator().manual_seed(7)
    shapes = {"a": (6, 4), "b": (10,), "c": (3, 5)}
    states = []
    for _ in range(5):
        states.append({k: torch.randn(s, generator=generator) + len(states) for k, s in shapes.items()})

    def shard(state, rank):
        return {k: v.chunk(2, dim=0)[rank].contiguous() for k, v in state.items()}

    def measure(view, window=3):
        average, drifts = WindowAverage(), []
        for index, state in enumerate(states):
            current = CapturedState(view(state))
            evicted = [lambda old=states[index - window]: view(old)] if index >= window else []
            average.update(current, evicted)
            previous = view(states[index - 1]) if index else None
            sums = average.drift_sums(current, previous)
            drifts.append(WeightDrift(10 * index + 10, 10 * index if index else None, average.count, *sums))
        return drifts

    whole = measure(lambda state: state)
    ranks = [measure(lambda state, rank=rank: shard(state, rank)) for rank in (0, 1)]
    for full, part0, part1 in zip(whole, *ranks, strict=True):
        combined = WeightDrift.combine([part0, part1])
        assert (combined.step, combined.previous_step, combined.n_models) == (
            full.step,
            full.previous_step,
            full.n_models,
        )
        for name in ("current_sq", "previous_sq", "average_sq"):
            expected = getattr(full, name)
            assert getattr(combined, name) == (
                None if expected is None else pytest.approx(expected, rel=RTOL)
            )
    # Oracle for the last step, in float64 from the states themselves.
    last, before = states[-1], states[-2]
    mean = {k: sum(s[k].double() for s in states[-3:]) / 3 for k in shapes}
    size = norm({k: v.double() for k, v in last.items()})
    previous = norm({k: last[k].double() - before[k].double() for k in shapes}) / size
    average = norm({k: last[k].double() - mean[k] for k in shapes}) / size
    assert WeightDrift.combine([ranks[0][-1], ranks[1][-1]]).relative() == (
        pytest.approx(previous, rel=RTOL),
        pytest.approx(average, rel=RTOL),
    )
    assert ranks[0][-1].relative() != pytest.approx((previous, average), rel=1e-3)  # one shard is not all


def test_combine_refuses_parts_of_different_snapshots():
    part = WeightDrift(20, 10, 3, 4.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="previous_step"):
        WeightDrift.combine([part, WeightDrift(20, 15, 3, 4.0, 1.0, 0.5)])
    with pytest.raises(ValueError, match="step"):
        WeightDrift.combine([part, WeightDrift(30, 10, 3, 4.0, 1.0, 0.5)])
    with pytest.raises(ValueError, match="n_models"):
        WeightDrift.combine([part, WeightDrift(20, 10, 2, 4.0, 1.0, 0.5)])
    with pytest.raises(ValueError, match="at least one"):
        WeightDrift.combine([])
    with pytest.raises(ValueError, match="WeightDrift"):
        WeightDrift.combine([part, {"step": 20}])


def test_relative_is_none_where_undefined():
    assert WeightDrift(1, None, 1, 9.0, None, 0.0).relative() == (None, 0.0)
    assert WeightDrift(2, 1, 2, 9.0, float("nan"), 1.0).relative() == (None, pytest.approx(1 / 3))
    assert WeightDrift(2, 1, 2, 0.0, 1.0, 0.0).relative() == (None, 0.0)  # all zeros now, not before
    assert WeightDrift(2, 1, 2, float("inf"), float("inf"), 1.0).relative() == (None, 0.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"step": -1}, "step must be an integer >= 0"),
        ({"previous_step": 20}, "previous_step must be before step 20"),
        ({"n_models": 0}, "n_models must be an integer >= 1"),
        ({"current_sq": -1.0}, "current_sq must be a sum of squares"),
        ({"average_sq": True}, "average_sq must be a sum of squares"),
        ({"previous_sq": None}, "previous_sq and previous_step go together"),
        ({"previous_step": None}, "previous_sq and previous_step go together"),
    ],
)
def test_weight_drift_refuses_bad_fields(fields, message):
    values = {"step": 20, "previous_step": 10, "n_models": 2, "current_sq": 4.0, "previous_sq": 1.0}
    with pytest.raises(ValueError, match=message):
        WeightDrift(**{**values, "average_sq": 0.5, **fields})


class MaskedNet(torch.nn.Module):
    """A causal mask of -inf (the average takes it from the newest snapshot) and a huge finite buffer,
    whose squares overflow float32 ((2**66)² > 3.4e38) but not float64."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 6)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))
        self.register_buffer("big", torch.full((3,), 2.0**66))


def test_held_masks_are_skipped_and_huge_values_do_not_overflow(tmp_path):
    window = make_window(StabilityConfig(window=3))
    model = MaskedNet()
    generator = torch.Generator().manual_seed(11)
    window.open(tmp_path)
    stored = {}
    try:
        for step in range(1, 6):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator))
                # Multiples of 2**60 near 2**66: the float32 running sum holds them exactly.
                model.big.fill_(2.0**66 + 2.0**60 * step)
            window.push(step, model.state_dict())
            window.wait()
            files = read_file(tmp_path, step)
            assert not bool(torch.isfinite(files["mask"]).all())
            stored[step] = {key: value for key, value in files.items() if key != "mask"}
            previous, average = oracle(tmp_path, stored[step], stored.get(step - 1), window.steps)
            drift = window.drift_of(step)
            assert math.isfinite(drift.current_sq) and drift.current_sq > 1e40
            got_previous, got_average = drift.relative()
            assert got_previous == (None if previous is None else pytest.approx(previous, rel=RTOL))
            assert got_average == pytest.approx(average, rel=RTOL, abs=0 if step > 1 else 1e-30)
    finally:
        window.release()


def test_a_uniform_shift_of_a_large_tensor_is_measured_to_float64_accuracy(tmp_path):
    """Every element moving by the same amount makes every square in a block the same number: a running
    float32 sum of 64K of them is off by several millionths, the cascade sum is not."""
    window = make_window(StabilityConfig(window=3))
    model = torch.nn.Linear(256, 300)  # 76,800 weights: more than one block
    window.open(tmp_path)
    stored = {}
    try:
        for step in range(1, 5):
            with torch.no_grad():
                # Large against the weights (about 0.06), so that the float32 running sum's own rounding
                # stays well below the tolerance in the average's drift.
                model.weight.add_(1e-2)
                model.bias.add_(1e-2)
            window.push(step, model.state_dict())
            window.wait()
            stored[step] = read_file(tmp_path, step)
            previous, average = oracle(tmp_path, stored[step], stored.get(step - 1), window.steps)
            got_previous, got_average = window.drift_of(step).relative()
            assert got_previous == (None if previous is None else pytest.approx(previous, rel=RTOL))
            assert got_average == pytest.approx(average, rel=RTOL, abs=0 if step > 1 else 1e-12)
    finally:
        window.release()
