"""Best-model selection and export: the exported weights against oracles, the pointer's crash safety."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_training import classify_task, make_data, train

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.selection import BestModelSelector, load_export


def read_export(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def run(tmp_path, **settings):
    x, y = make_data(11)
    seen: list[dict] = []
    monitor = StabilityMonitor(
        [classify_task(x, y, seen=seen)],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        **settings,
    )
    train(40, monitor)
    monitor.close()
    return monitor, seen


def test_avg_policy_exports_the_window_average_of_the_best_step(tmp_path):
    monitor, seen = run(tmp_path, min_snapshots=2)
    raws, avgs = seen[0::2], seen[1::2]
    history = monitor.history.records(task="mean", variant="avg")
    eligible = history[1:]  # selection starts at the second snapshot
    best_score = max(r["score"] for r in eligible)
    first_best = next(r for r in eligible if r["score"] == best_score)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["step"] == first_best["step"] and best["variant"] == "avg"
    assert best["score"] == pytest.approx(best_score)
    assert best["path"] == f"exports/step-{first_best['step']:08d}-avg"
    index = first_best["step"] // 5 - 1
    assert best["steps"] == [5 * (i + 1) for i in range(max(0, index - 2), index + 1)]
    exported = read_export(tmp_path / best["path"])
    window = raws[max(0, index - 2) : index + 1]
    for key, value in exported.items():
        if value.is_floating_point():
            oracle = sum(w[key].double() for w in window) / len(window)
            torch.testing.assert_close(value.double(), oracle, rtol=0, atol=1e-6)
            assert value.dtype == torch.float32
        else:
            assert torch.equal(value, window[-1][key])
    # It is exactly what the avg evaluation at that step saw.
    for key, value in avgs[index].items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-6)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [Path(best["path"]).name]
    assert monitor.best_model_path == tmp_path / best["path"]


def test_raw_policy_min_mode_and_min_snapshots(tmp_path):
    # min_snapshots above the window (3) means "once the window is full".
    monitor, seen = run(tmp_path, select="raw", select_mode="min", min_snapshots=4)
    raws = seen[0::2]
    history = monitor.history.records(task="mean", variant="raw")[2:]
    worst = min(r["score"] for r in history)
    chosen = next(r for r in history if r["score"] == worst)
    best = monitor.best
    assert best["step"] == chosen["step"] and best["variant"] == "raw" and best["steps"] == [chosen["step"]]
    exported = load_export(monitor.best_model_path)
    for key, value in raws[chosen["step"] // 5 - 1].items():
        assert torch.equal(exported[key], value)


def test_any_policy_can_pick_the_ensemble_as_a_window(tmp_path):
    selector = BestModelSelector(tmp_path, select="any")
    records = [
        {"step": 30, "task": "mean", "variant": "raw", "window": 1, "score": 0.5},
        {"step": 30, "task": "mean", "variant": "avg", "window": 3, "score": 0.6},
        {"step": 30, "task": "mean", "variant": "ens", "window": 3, "score": 0.7},
    ]
    chosen = selector.candidate(records, snapshots_in_window=3)
    assert chosen["variant"] == "ens"
    selector.commit(chosen, {"t": 0.7}, [20, 25, 30], None)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["path"] is None and best["steps"] == [20, 25, 30] and best["variant"] == "ens"
    # A tie between variants goes to avg, then raw.
    tied = [dict(r, score=0.9, step=35) for r in records]
    assert selector.candidate(tied, snapshots_in_window=4)["variant"] == "avg"
    assert BestModelSelector(tmp_path, select="any").best == best


def test_selection_off_writes_nothing(tmp_path):
    monitor, _ = run(tmp_path, select=None)
    assert monitor.best is None
    assert not (tmp_path / "best.json").exists() and not (tmp_path / "exports").exists()


def test_resume_before_the_best_drops_it(tmp_path, caplog):
    monitor, _ = run(tmp_path, min_snapshots=3)
    best_step = monitor.best["step"]
    assert best_step >= 15
    x, y = make_data(11)
    resumed = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    with caplog.at_level(logging.WARNING):
        resumed.open(resume_step=best_step - 5)
    assert resumed.best is None
    assert not (tmp_path / "best.json").exists()
    assert list((tmp_path / "exports").iterdir()) == []
    assert "restarting selection" in caplog.text
    resumed.close()


def test_open_removes_exports_the_pointer_does_not_name(tmp_path):
    monitor, _ = run(tmp_path)
    named = monitor.best_model_path
    # A crash after writing a new export but before switching the pointer leaves an orphan.
    orphan = tmp_path / "exports" / "step-00000099-avg"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    staging = tmp_path / "exports" / ".step-00000100-avg.tmp-1"
    staging.mkdir()
    selector = BestModelSelector(tmp_path)
    assert selector.best_path == named
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [named.name]


@pytest.mark.parametrize(
    "path",
    ["../outside", "/tmp/x", "exports/../../outside", "exports/step-00000010-avg/../../x", "exports/other"],
)
def test_a_pointer_outside_exports_is_refused(tmp_path, path, caplog):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "model.safetensors").write_bytes(b"keep me")
    (tmp_path / "best.json").write_text(
        json.dumps({"path": path, "step": 10, "variant": "avg", "score": 1.0, "steps": [10]})
    )
    with caplog.at_level(logging.WARNING):
        selector = BestModelSelector(tmp_path)
    assert selector.best is None
    assert (outside / "model.safetensors").read_bytes() == b"keep me"
    assert "best.json" in caplog.text


def test_a_failed_export_keeps_the_previous_best_and_leaves_no_staging(tmp_path, monkeypatch, caplog):
    from checkpoint_stability.storage.export import ModelExporter

    real_write, calls = ModelExporter.write, []

    def full_disk_after_the_first(self, directory, weights, metadata):
        calls.append(metadata["step"])
        if len(calls) == 1:
            return real_write(self, directory, weights, metadata)
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelExporter, "write", full_disk_after_the_first)
    with caplog.at_level(logging.WARNING):
        monitor, _ = run(tmp_path, min_snapshots=1, select_mode="min")
    assert len(calls) >= 2, "the test needs a second best to fail on"
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["step"] == int(calls[0]) and monitor.best == best
    # The kept export is whole: every tensor reads back.
    assert set(read_export(tmp_path / best["path"])) >= {"hidden.weight", "out.bias", "norm.running_mean"}
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [Path(best["path"]).name]
    errors = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert any(line.get("phase") == "export" and "No space left" in line["error"] for line in errors)
    assert "No space left" in caplog.text
