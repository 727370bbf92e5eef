"""Hostile and broken inputs to a live run directory: links planted where the library writes, JSON
that parses but is damaged, unusual buffers, and names that cannot be file names.

Each test here failed on the code before the fix it covers (see the closing note of the issue on
hostile inputs). Outcomes are checked on the files themselves: a sentinel outside the run directory
byte for byte, the exports on disk, the records and error lines read back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import pytest
import torch
from tiny_training import classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability import buffer as buffer_module
from checkpoint_stability.storage.run_lock import RunLock

SENTINEL = b"outside the run directory: must never change\n{torn"


def quiet(**settings):
    return {"console": False, "tensorboard": False, **settings}


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "outside" / "private.jsonl"
    path.parent.mkdir()
    path.write_bytes(SENTINEL)
    return path


def finished_run(run, steps=20, **settings):
    x, y = make_data(3)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet(**settings)
    )
    train(steps, monitor)
    monitor.close()
    return monitor


def lock_is_free(run) -> bool:
    try:
        RunLock(run).release()
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------- S1: symlinks


@pytest.mark.parametrize("where", ["examples/cls.jsonl", "examples/cls.meta.json", "examples"])
def test_a_link_in_examples_is_refused_and_its_target_never_written(tmp_path, sentinel, where):
    run = tmp_path / "run"
    finished_run(run)
    planted = run / where
    if planted.is_dir():
        shutil.rmtree(planted)
        os.symlink(sentinel.parent, planted)
        sentinel_copy = sentinel.parent / "cls.jsonl"
        sentinel_copy.write_bytes(SENTINEL)
    else:
        planted.unlink()
        os.symlink(sentinel, planted)
        sentinel_copy = sentinel
    x, y = make_data(3)
    resumed = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    with pytest.raises(ValueError, match=r"symlink|outside"):
        resumed.open(resume_step=10)
    assert sentinel_copy.read_bytes() == SENTINEL
    assert lock_is_free(run)
    # Through the training loop (on_error="warn"): each snapshot reports it, training goes on, and
    # nothing outside is touched.
    train(25, resumed)
    assert sentinel_copy.read_bytes() == SENTINEL
    assert lock_is_free(run)


# ---------------------------------------------------------------------------- B2: settings change on resume


def test_resuming_with_another_select_metric_keeps_the_previous_best(tmp_path):
    run = tmp_path / "run"
    x, y = make_data(3)
    tasks = [classify_task(x, y, name="a"), classify_task(x, y[torch.randperm(len(y))], name="b")]
    first = StabilityMonitor(tasks, dirpath=run, window=3, every_n_steps=5, **quiet())
    train(20, first)
    first.close()
    before = first.best
    assert before is not None and before["metric"] == "mean"
    export = run / before["path"]
    weights = (export / "model.safetensors").read_bytes()

    resumed = StabilityMonitor(tasks, dirpath=run, window=3, every_n_steps=5, select_metric="b", **quiet())
    resumed.open(resume_step=20)
    assert resumed.best["step"] == before["step"]  # still the pointer until the new selection commits
    resumed.close()
    # The export made before the resume is still there, whole.
    assert (export / "model.safetensors").read_bytes() == weights

    again = StabilityMonitor(tasks, dirpath=run, window=3, every_n_steps=5, select_metric="b", **quiet())
    again.open(resume_step=20)
    model = train(20)
    again.on_snapshot(model, 25)
    again.close()
    pointer = json.loads((run / "best.json").read_text())
    assert pointer["metric"] == "b"
    assert [(kept["path"], kept["metric"]) for kept in pointer["kept"]] == [(before["path"], "mean")]
    assert (export / "model.safetensors").read_bytes() == weights
    # Reopened once more: the kept export is named, so it is not cleaned away as an orphan.
    StabilityMonitor(tasks, dirpath=run, window=3, every_n_steps=5, select_metric="b", **quiet()).open(
        resume_step=25
    )
    assert (export / "model.safetensors").read_bytes() == weights


# ------------------------------------------------------------------------- B3: damaged but parseable lines


@pytest.mark.parametrize(
    "damage",
    [
        {"correct": 7.0},  # not a list
        {"correct": [7.0] * 40},  # out of [0, 1]
        {"correct": [1.0] * 3},  # the wrong length
        {"outputs": [0] * 3, "correct": [1.0] * 3},  # consistent, but not this task's examples
    ],
)
def test_a_damaged_examples_line_is_skipped_and_the_run_goes_on(tmp_path, caplog, damage):
    run = tmp_path / "run"
    finished_run(run)
    path = run / "examples" / "cls.jsonl"
    lines = path.read_text().splitlines()
    damaged = {**json.loads(lines[0]), **damage}
    path.write_text("\n".join([json.dumps(damaged), *lines[1:]]) + "\n")
    x, y = make_data(3)
    resumed = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    with caplog.at_level(logging.WARNING):
        resumed.open(resume_step=20)
        records = resumed.on_snapshot(train(20), 25)
    resumed.close()
    assert {(r["task"], r["variant"]) for r in records} >= {("cls", "raw"), ("cls", "avg"), ("cls", "ens")}
    assert not resumed.history.errors()
    assert "damaged" in caplog.text or "do not match" in caplog.text
    assert lock_is_free(run)


def test_a_failed_open_releases_the_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    finished_run(run)

    def broken(*args, **kwargs):
        raise RuntimeError("series exploded")

    x, y = make_data(3)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    monkeypatch.setattr(monitor, "_rebuild_series", broken)
    with pytest.raises(RuntimeError, match="series exploded"):
        monitor.open(resume_step=20)
    assert lock_is_free(run)


# --------------------------------------------------------------------------------- B4: deeply nested JSON


@pytest.mark.parametrize("name", ["run.json", "buffer/manifest.json", "best.json", "lock.json"])
def test_json_nested_too_deeply_is_the_files_own_error_not_a_recursion_error(tmp_path, caplog, name):
    run = tmp_path / "run"
    finished_run(run)
    (run / name).write_text("[" * 100_000 + "]" * 100_000)
    x, y = make_data(3)
    resumed = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    with caplog.at_level(logging.WARNING):
        resumed.open(resume_step=20)
        records = resumed.on_snapshot(train(20), 25)
    resumed.close()
    assert any(r["variant"] == "raw" for r in records)
    if name != "lock.json":
        assert name.split("/")[-1] in caplog.text and "nested too deeply" in caplog.text


# ------------------------------------------------------------------------------- B5: an alias to nothing


def test_a_manifest_alias_naming_a_missing_tensor_drops_the_entry(tmp_path, caplog):
    run = tmp_path / "run"
    finished_run(run)
    manifest_path = run / "buffer" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    kept = [entry["step"] for entry in manifest["snapshots"]]
    manifest["snapshots"][0]["aliases"] = {"out.alias": "no.such.tensor"}
    manifest_path.write_text(json.dumps(manifest))
    x, y = make_data(3)
    resumed = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    with caplog.at_level(logging.WARNING):
        resumed.open(resume_step=20)
    assert resumed.buffer.steps == kept[1:]
    assert "no.such.tensor" in caplog.text
    resumed.close()


def test_out_of_order_manifest_entries_are_sorted_not_deleted(tmp_path):
    run = tmp_path / "run"
    finished_run(run)
    manifest_path = run / "buffer" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    steps = [entry["step"] for entry in manifest["snapshots"]]
    manifest["snapshots"].reverse()
    manifest_path.write_text(json.dumps(manifest))
    buffer = buffer_module.SnapshotBuffer(run / "buffer", window=3)
    assert buffer.steps == steps
    assert all((run / "buffer" / f"step-{step:08d}.safetensors").is_file() for step in steps)
    buffer.close()


# ------------------------------------------------------------------------- B6: legitimate non-finite buffers


class MaskedNet(torch.nn.Module):
    """A classifier with a causal-mask-like buffer of -inf, added to logits where it is 0."""

    def __init__(self, mask_value=float("-inf")):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        mask = torch.zeros(4)
        mask[3] = mask_value
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.linear(x) + self.mask


def train_masked(monitor, steps=30, model=None, poison_at=None):
    torch.manual_seed(0)
    x, y = make_data(4)
    y = y % 3
    model = model or MaskedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if poison_at == step:
            model.mask[0] = float("nan")
        monitor.step(model, step)
    return model, x, y


def test_a_mask_buffer_of_minus_infinity_is_averaged_and_selected(tmp_path):
    x, y = make_data(4)
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=(y % 3).tolist())
    monitor = StabilityMonitor([task], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    model, _, _ = train_masked(monitor)
    monitor.close()
    assert monitor.buffer.steps == [20, 25, 30]
    assert not monitor.history.errors()
    averaged = monitor.average.mean()
    # Past several evictions: the mask is the newest snapshot's, never NaN from inf - inf.
    assert torch.equal(averaged["mask"], model.mask)
    assert [r["n_models"] for r in monitor.history.records(task="cls", variant="avg")][-1] == 3
    assert monitor.best is not None and monitor.best["variant"] == "avg"


def test_a_buffer_that_turns_nan_during_training_is_still_rejected(tmp_path):
    x, y = make_data(4)
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=(y % 3).tolist())
    monitor = StabilityMonitor([task], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    train_masked(monitor, steps=25, poison_at=25)  # after the step: parameters still finite
    monitor.close()
    errors = monitor.history.errors()
    assert [(e["step"], e["phase"]) for e in errors if e["phase"] == "snapshot"] == [(25, "snapshot")]
    assert "'mask'" in errors[0]["error"]


def test_a_storage_dtype_that_overflows_a_buffer_is_named_at_the_first_snapshot(tmp_path):
    x, y = make_data(4)
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=(y % 3).tolist())
    monitor = StabilityMonitor(
        [task], dirpath=tmp_path, window=3, every_n_steps=5, storage_dtype="float16", **quiet()
    )
    train_masked(monitor, model=MaskedNet(torch.finfo(torch.float32).min))
    monitor.close()
    errors = monitor.history.errors()
    assert [(e["step"], e["phase"]) for e in errors] == [(5, "config")]
    assert "'mask'" in errors[0]["error"] and "float16" in errors[0]["error"]
    # The snapshots themselves are admitted: the run has an average and a best.
    assert monitor.buffer.steps == [20, 25, 30]
    assert monitor.best is not None


# ------------------------------------------------------------------------------- B7: an expanded buffer


class ExpandedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        self.register_buffer("bias_rows", torch.zeros(1, 4).expand(3, 4), persistent=True)

    def forward(self, x):
        return self.linear(x) + self.bias_rows[0]


def test_an_expanded_buffer_is_snapshotted_and_restored(tmp_path):
    torch.manual_seed(0)
    x, y = make_data(5)
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())
    monitor = StabilityMonitor([task], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    model = ExpandedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        monitor.step(model, step)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
    monitor.close()
    assert not monitor.history.errors()
    assert [r["step"] for r in monitor.history.records(task="cls", variant="avg")] == [5, 10, 15]
    assert model.bias_rows.stride() == (0, 1)


# --------------------------------------------------------------------------------------- B9: task names


@pytest.mark.parametrize("name", ["字" * 100, "a\nb", "tab\there", "bell\x07"])
def test_task_names_that_cannot_name_files_are_refused_at_construction(name):
    with pytest.raises(ValueError, match=r"bytes|control character"):
        FunctionTask(name, lambda m: [0], targets=[0])


def test_a_long_task_name_within_the_byte_limit_runs_and_writes_its_files(tmp_path):
    x, y = make_data(3)
    name = "字" * 66  # 198 bytes
    monitor = StabilityMonitor(
        [classify_task(x, y, name=name)], dirpath=tmp_path, window=3, every_n_steps=5, **quiet()
    )
    train(10, monitor)
    monitor.close()
    assert not monitor.history.errors()
    assert (tmp_path / "examples" / f"{name}.jsonl").is_file()


# --------------------------------------------------------------------------------- lock.json, read-only


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_file_that_cannot_lock_is_refused_not_ignored(tmp_path, kind):
    lock = tmp_path / "lock.json"
    if kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    x, y = make_data(3)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    with pytest.raises(ValueError, match=r"lock\.json is a (directory|FIFO)"):
        monitor.open()


def test_a_read_only_run_directory_is_named_in_the_message(tmp_path, monkeypatch):
    import checkpoint_stability.storage.run_lock as run_lock

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith("lock.json") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", read_only)
    x, y = make_data(3)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    with pytest.warns(UserWarning) as warned:
        monitor.try_open()
    message = str(warned[0].message)
    assert "Read-only file system" in message and str(tmp_path / "lock.json") in message
    assert "collide" not in message


# ------------------------------------------------------------------------------------- full disk and avg


def test_an_avg_record_is_not_made_from_a_window_missing_its_own_snapshot(tmp_path, monkeypatch):
    x, y = make_data(7)
    real_write = buffer_module.atomic_write_bytes

    def disk_full_at_step_10(path, data, **options):
        if path.name == "step-00000010.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", disk_full_at_step_10)
    monitor = StabilityMonitor([classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, **quiet())
    train(15, monitor)
    monitor.close()
    assert [r["step"] for r in monitor.history.records(task="cls", variant="avg")] == [5, 15]
    notes = [e for e in monitor.history.errors() if e["phase"] == "average"]
    assert [e["step"] for e in notes] == [10] and "not in the window" in notes[0]["error"]


def test_choice_logprobs_nested_deeply_are_a_damaged_line_not_a_recursion_error(tmp_path, caplog):
    run = tmp_path / "run"
    finished_run(run)
    path = run / "examples" / "cls.jsonl"
    lines = path.read_text().splitlines()
    deep = json.loads(lines[0])
    deep["choice_logprobs"] = [json.loads("[" * 900 + "]" * 900)] * len(deep["outputs"])
    path.write_text("\n".join([json.dumps(deep), *lines[1:]]) + "\n")
    from checkpoint_stability.history import History

    with caplog.at_level(logging.WARNING):
        history = History(run)
    assert len(history.outputs("cls")) == len(lines) - 1
    assert "damaged" in caplog.text


def test_a_run_without_tasks_replaces_its_own_export_and_keeps_it_once_tasks_arrive(tmp_path):
    run = tmp_path / "run"
    for steps in (10, 20):  # resumed without tasks: the latest average replaces the previous one
        monitor = StabilityMonitor([], dirpath=run, window=3, every_n_steps=5, **quiet())
        if steps == 20:
            monitor.open(resume_step=10)
        model = train(steps)
        monitor.on_snapshot(model, steps)
        monitor.close()
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["step-00000020-avg"]
    unscored = run / "exports" / "step-00000020-avg" / "model.safetensors"
    weights = unscored.read_bytes()

    x, y = make_data(3)
    with_tasks = StabilityMonitor([classify_task(x, y)], dirpath=run, window=3, every_n_steps=5, **quiet())
    with_tasks.open(resume_step=20)
    with_tasks.on_snapshot(train(25), 25)
    with_tasks.close()
    pointer = json.loads((run / "best.json").read_text())
    assert pointer["step"] == 25 and pointer["score"] is not None
    assert [(kept["step"], kept["score"]) for kept in pointer["kept"]] == [(20, None)]
    assert unscored.read_bytes() == weights


def test_numbers_too_large_for_a_float_are_a_damaged_line(tmp_path, caplog):
    run = tmp_path / "run"
    finished_run(run)
    path = run / "history.jsonl"
    lines = path.read_text().splitlines()
    huge = {**json.loads(lines[0]), "mtv": 10**400}  # found by the fuzz test: OverflowError before
    path.write_text("\n".join([json.dumps(huge), *lines[1:]]) + "\n")
    from checkpoint_stability.history import History

    with caplog.at_level(logging.WARNING):
        history = History(run)
    assert len(history.records()) == len(lines) - 1
    assert "damaged" in caplog.text
