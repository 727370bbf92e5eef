"""Faults the monitor must survive without killing training (on_error="warn"), and must surface with
on_error="raise": changed models and tasks, unusable directories, symlinks, foreign sinks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed as dist
from tiny_training import classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.selection import BestModelSelector


def quiet(**settings):
    return {"console": False, "tensorboard": False, **settings}


def test_a_changed_model_restarts_the_window(tmp_path, caplog):
    x, y = make_data(20)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=1, **quiet())
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    for step in (1, 2):
        monitor.on_snapshot(model, step)
    wider = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with caplog.at_level(logging.WARNING):
        records = monitor.on_snapshot(wider, 3)
        monitor.on_snapshot(wider, 4)
    monitor.close()
    assert "restarting the window" in caplog.text
    assert monitor.buffer.steps == [3, 4]
    assert {(r["variant"], r["n_models"]) for r in records if r["task"] == "cls"} == {
        ("raw", 1),
        ("avg", 1),
        ("ens", 3),
    }
    assert monitor.history.errors() == []


def test_a_task_whose_example_count_changes_does_not_break_is(tmp_path):
    current = {"n": 5}

    class Growing(FunctionTask):
        """A task whose example set grows between snapshots (e.g. redefined on resume)."""

        def evaluate(self, model):
            self.targets = [0] * current["n"]
            self.example_ids = list(range(current["n"]))
            return super().evaluate(model)

    growing = Growing("grow", lambda model: [0] * current["n"], targets=[0] * 5)
    monitor = StabilityMonitor(
        [growing], dirpath=tmp_path, window=2, every_n_steps=1, ensemble=None, **quiet()
    )
    model = torch.nn.Linear(2, 2)
    raw_is = []
    for step, size in zip(range(1, 6), (5, 5, 7, 7, 7), strict=True):
        current["n"] = size
        records = monitor.on_snapshot(model, step)
        raw_is.append(next(r["is"] for r in records if r["task"] == "grow" and r["variant"] == "raw"))
    monitor.close()
    # IS restarts when the number of examples changes (step 3) instead of failing on ragged rows.
    assert raw_is == [None, 0.0, None, 0.0, 0.0]
    # The changed example set is refused by the history (results would not be comparable), as a fault.
    assert {e["phase"] for e in monitor.history.errors()} == {"history"}


def test_an_unusable_directory_is_a_fault_not_a_crash(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    x, y = make_data(21)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=blocker / "run", every_n_steps=5, **quiet())
    with caplog.at_level(logging.WARNING):
        model = train(10, monitor)
    assert model is not None
    assert "open failed" in caplog.text and "NotADirectoryError" in caplog.text
    strict = StabilityMonitor([], dirpath=blocker / "run", every_n_steps=5, on_error="raise", **quiet())
    with pytest.raises(NotADirectoryError):
        train(5, strict)


def test_one_tasks_changed_targets_do_not_cost_the_others_their_history(tmp_path):
    x, y = make_data(22)
    first = StabilityMonitor(
        [classify_task(x, y, "a"), classify_task(x, y, "b")], dirpath=tmp_path, every_n_steps=5, **quiet()
    )
    train(10, first)
    first.close()
    changed = y.clone()
    changed[0] = (changed[0] + 1) % 4
    second = StabilityMonitor(
        [classify_task(x, y, "a"), classify_task(x, changed, "b")],
        dirpath=tmp_path,
        every_n_steps=5,
        **quiet(),
    )
    second.open(resume_step=10)
    model = train(10)
    second.on_snapshot(model, 15)
    second.close()
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert {(r["task"], r["variant"]) for r in lines if r.get("step") == 15 and "error" not in r} >= {
        ("a", "raw"),
        ("b", "raw"),
        ("mean", "raw"),
    }
    errors = [r for r in lines if "error" in r]
    assert errors and all(e["task"] == "b" and e["phase"] == "history" for e in errors)
    assert "changed" in errors[0]["error"]
    assert [line["step"] for line in second.history.outputs("a", variant="raw")] == [5, 10, 15]


class ListSink:
    def __init__(self):
        self.steps, self.closed = [], False

    def write(self, step, records):
        assert not self.closed, "written after close"
        self.steps.append(step)

    def close(self):
        self.closed = True


def test_caller_sinks_survive_a_resume_and_are_not_closed(tmp_path):
    x, y = make_data(23)
    sink = ListSink()
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, every_n_steps=5, sinks=[sink], **quiet()
    )
    model = train(15, monitor)
    monitor.on_snapshot(model, 10)  # an implicit resume from step 9
    monitor.on_snapshot(model, 15)
    monitor.close()
    assert sink.steps == [5, 10, 15, 10, 15]
    assert not sink.closed


@pytest.mark.parametrize("name", ["history.jsonl", "exports", "examples", "buffer", "best.json"])
def test_symlinks_in_the_run_directory_are_refused(tmp_path, name, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    x, y = make_data(24)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=run, every_n_steps=5, **quiet())
    with caplog.at_level(logging.WARNING):
        train(10, monitor)
    assert "symlink" in caplog.text
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_text() == "keep"


def test_min_snapshots_counts_what_the_buffer_holds_after_a_resume(tmp_path):
    x, y = make_data(25)
    first = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, select=None, **quiet()
    )
    train(30, first)
    first.close()
    resumed = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, min_snapshots=2, **quiet()
    )
    resumed.open(resume_step=10)  # window of two at step 30 held 25 and 30: nothing survives
    assert resumed.buffer.steps == [] and resumed.best is None
    model = train(10)
    resumed.on_snapshot(model, 15)
    assert resumed.best is None, "a one-snapshot window must not be selected"
    resumed.on_snapshot(model, 20)
    resumed.close()
    assert resumed.best is not None and resumed.best["step"] == 20


def test_average_every_counts_snapshots_not_steps(tmp_path):
    x, y = make_data(26)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, every_n_steps=500, average_every=2, **quiet()
    )
    model = train(5)
    for step in (100, 200, 300, 400, 500):
        monitor.on_snapshot(model, step)
    monitor.close()
    assert [r["step"] for r in monitor.history.records(task="cls", variant="avg")] == [100, 300, 500]


def test_a_best_selected_on_another_metric_is_kept_and_selection_restarts_beside_it(tmp_path, caplog):
    selector = BestModelSelector(tmp_path, select="any", metric="mean", mode="max")
    record = {"step": 10, "task": "mean", "variant": "ens", "window": 3, "score": 0.9}
    selector.commit(record, {}, [5, 10], None)
    with caplog.at_level(logging.WARNING):
        reopened = BestModelSelector(tmp_path, select="any", metric="mean", mode="min")
    assert "mode 'max' -> 'min'" in caplog.text
    # The old best is still the pointer, but a new candidate is not compared with it.
    assert reopened.best["step"] == 10
    worse_under_max = {"step": 20, "task": "mean", "variant": "ens", "window": 3, "score": 0.95}
    assert reopened.candidate([worse_under_max], snapshots_in_window=3) is not None
    reopened.commit(worse_under_max, {}, [15, 20], None)
    on_disk = json.loads((tmp_path / "best.json").read_text())
    assert (on_disk["step"], on_disk["mode"]) == (20, "min")
    assert [(kept["step"], kept["mode"]) for kept in on_disk["kept"]] == [(10, "max")]


def test_sharded_weights_are_buffered_per_rank_and_a_different_world_size_is_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Linear(4, 4)
        model.weight = torch.nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
        monitor = StabilityMonitor([], dirpath=tmp_path, window=2, every_n_steps=1, **quiet())
        states = []
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.to_local().add_(1.0)
                model.bias.add_(0.5)
            states.append({"weight": model.weight.to_local().clone(), "bias": model.bias.detach().clone()})
            monitor.on_snapshot(model, step)
        monitor.close()
        assert sorted(p.name for p in (tmp_path / "buffer" / "rank-0").glob("*.safetensors")) == [
            "step-00000002.safetensors",
            "step-00000003.safetensors",
        ]
        assert json.loads((tmp_path / "run.json").read_text()) == {"world_size": 1, "sharded": True}
        for key in ("weight", "bias"):
            oracle = (states[1][key].double() + states[2][key].double()) / 2
            torch.testing.assert_close(monitor.average.mean()[key].double(), oracle, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "sharded": True}))
    with pytest.raises(ValueError, match="same world size"):
        StabilityMonitor([], dirpath=tmp_path, every_n_steps=1, **quiet()).open()


def test_raise_mode_surfaces_rank_zero_faults_at_the_end_of_the_snapshot(tmp_path, monkeypatch):
    x, y = make_data(27)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, every_n_steps=5, on_error="raise", **quiet()
    )

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    model = train(5)
    monitor.open()
    monkeypatch.setattr(monitor.history, "append_many", broken)
    with pytest.raises(OSError, match="No space"):
        monitor.on_snapshot(model, 5)
    assert [e["phase"] for e in monitor.history.errors()] == ["history"]


def test_non_finite_weights_stay_out_of_the_average_and_of_selection(tmp_path, caplog):
    targets = [0, 1, 2, 3]

    def predict(model):
        # A poisoned model "answers" everything right, so raw selection would pick it if it could.
        if not torch.isfinite(model.weight).all():
            return list(targets)
        return [1, 0, 3, 2] if model.weight.mean() > 0 else [0, 0, 0, 0]

    task = FunctionTask("probe", predict, targets=targets)
    monitor = StabilityMonitor([task], dirpath=tmp_path, window=3, every_n_steps=1, select="raw", **quiet())
    model = torch.nn.Linear(4, 4)
    history = {}
    with caplog.at_level(logging.WARNING):
        for step in range(1, 7):
            with torch.no_grad():
                model.weight.fill_(0.1 * step)
                if step == 4:
                    model.weight[0, 0] = float("nan")
            history[step] = model.weight.detach().clone()
            monitor.on_snapshot(model, step)
    monitor.close()

    assert "not finite" in caplog.text and "'weight'" in caplog.text and "step 4" in caplog.text
    assert monitor.buffer.steps == [3, 5, 6]  # the window skips step 4
    assert not (tmp_path / "buffer" / "step-00000004.safetensors").exists()
    # The average is the float64 mean of the finite snapshots of the window, never NaN.
    expected = sum(history[s].double() for s in monitor.buffer.steps) / len(monitor.buffer.steps)
    torch.testing.assert_close(monitor.average.mean()["weight"].double(), expected, rtol=0, atol=1e-6)
    # Step 4's raw record is what it is (score 1.0), but it was not selected.
    raw = {r["step"]: r["score"] for r in monitor.history.records() if r["variant"] == "raw"}
    assert raw[4] == 1.0 and monitor.best is not None and monitor.best["step"] != 4
    errors = monitor.history.errors()
    assert [(e["step"], e["phase"]) for e in errors] == [(4, "snapshot"), (4, "average")]
    assert "not finite" in errors[0]["error"] and "not in the window" in errors[1]["error"]
    # Step 4 has no avg record: the window lacked its snapshot, so no average could speak for it.
    assert 4 not in {r["step"] for r in monitor.history.records(variant="avg")}


def test_another_models_snapshots_left_in_the_directory_restart_the_window(tmp_path, caplog):
    first = StabilityMonitor([], dirpath=tmp_path, window=3, every_n_steps=1, **quiet())
    small = torch.nn.Linear(6, 4)
    for step in (1, 2, 3):
        first.on_snapshot(small, step)
    first.close()

    wider = torch.nn.Linear(6, 8)
    second = StabilityMonitor([], dirpath=tmp_path, window=3, every_n_steps=1, **quiet())
    second.open(resume_step=3)
    with caplog.at_level(logging.WARNING):
        second.on_snapshot(wider, 4)
        second.on_snapshot(wider, 5)
    second.close()
    assert "the model's 'bias' has shape (8,), the window's (4,)" in caplog.text  # the first that differs
    assert "restarting the window from step 4" in caplog.text
    assert second.buffer.steps == [4, 5]
    assert sorted(p.name for p in (tmp_path / "buffer").glob("*.safetensors")) == [
        "step-00000004.safetensors",
        "step-00000005.safetensors",
    ]
    torch.testing.assert_close(second.average.mean()["weight"], wider.weight.detach())
