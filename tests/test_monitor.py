"""StabilityMonitor end to end on a tiny model, every number checked against an independent oracle."""

from __future__ import annotations

import errno
import itertools
import json
import logging
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from tensorboard_runs import assert_runs_match, expected_runs, read_runs
from tiny_training import EXAMPLES, Net, classify_task, make_data, train

from checkpoint_stability import ExistingRunError, FunctionTask, StabilityConfig, StabilityMonitor
from checkpoint_stability import buffer as buffer_module
from checkpoint_stability.buffer import SnapshotError


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    x, y = make_data(1)
    plain = train(40)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    watched = train(40, monitor)
    monitor.close()
    assert watched.training and all(m.training for m in watched.modules())
    assert torch.is_grad_enabled()
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(monitor.history.records(task="cls", variant="raw")) == 8


def test_ensemble_and_average_cost_no_extra_evaluation(tmp_path):
    x, y = make_data(2)
    calls = Counter()

    class CountingTask(FunctionTask):
        def evaluate(self, model):
            calls["evaluate"] += 1
            return super().evaluate(model)

    def predict(model):
        calls["forward"] += 1
        return model(x).argmax(-1).tolist()

    def run(window):
        calls.clear()
        task = CountingTask("count", predict, targets=y.tolist())
        monitor = StabilityMonitor(
            [task],
            dirpath=tmp_path / f"w{window}",
            window=window,
            every_n_steps=5,
            console=False,
            tensorboard=False,
        )
        train(30, monitor)
        monitor.close()
        return dict(calls)

    snapshots = 6
    # One raw and one avg evaluation per snapshot, whatever the window; the ensemble adds nothing.
    assert run(1) == run(3) == run(6) == {"evaluate": 2 * snapshots, "forward": 2 * snapshots}


def test_records_match_hand_computed_votes_mtv_and_is(tmp_path):
    x, y = make_data(3)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=4, horizon=4, console=False
    )
    train(40, monitor)
    monitor.close()

    lines = [json.loads(line) for line in (tmp_path / "examples" / "cls.jsonl").read_text().splitlines()]
    raw = [line for line in lines if line["variant"] == "raw"]
    ens = [line for line in lines if line["variant"] == "ens"]
    targets = y.tolist()
    assert [line["step"] for line in raw] == list(range(4, 41, 4))
    for index, line in enumerate(ens):
        window = raw[max(0, index - 2) : index + 1]
        for example in range(EXAMPLES):
            votes = Counter(w["outputs"][example] for w in window)
            top = max(votes.values())
            tied = [o for o, c in votes.items() if c == top]
            if len(tied) > 1:
                sums = {o: sum(w["choice_logprobs"][example][o] for w in window) for o in tied}
                best = max(sums.values())
                tied = [o for o in tied if sums[o] == best]
                expected = next(
                    w["outputs"][example] for w in reversed(window) if w["outputs"][example] in tied
                )
            else:
                expected = tied[0]
            assert line["outputs"][example] == expected, (line["step"], example)
        assert line["correct"] == [float(o == t) for o, t in zip(line["outputs"], targets, strict=True)]

    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    for variant in ("raw", "avg", "ens"):
        series = [r for r in history if r["task"] == "cls" and r["variant"] == variant]
        outputs = [line["outputs"] for line in lines if line["variant"] == variant]
        assert len(series) == 10 and len(outputs) == 10
        for t, record in enumerate(series):
            scores = [r["score"] for r in series[max(0, t - 3) : t + 1]]
            assert record["score"] == pytest.approx(sum(lines_correct(lines, variant)[t]) / EXAMPLES)
            if len(scores) < 2:
                assert record["mtv"] is None and record["is"] is None
                continue
            mtv = sum(abs(b - a) for a, b in itertools.pairwise(scores)) / (len(scores) - 1)
            assert record["mtv"] == pytest.approx(mtv, abs=1e-12)
            block = outputs[max(0, t - 3) : t + 1]
            flips = [
                sum(block[k][i] != block[k + 1][i] for k in range(len(block) - 1)) / (len(block) - 1)
                for i in range(EXAMPLES)
            ]
            assert record["is"] == pytest.approx(sum(flips) / EXAMPLES, abs=1e-12)
        expected_window = 1 if variant == "raw" else 3
        assert {r["window"] for r in series} == {expected_window}
        assert [r["n_models"] for r in series][:4] == ([1, 1, 1, 1] if variant == "raw" else [1, 2, 3, 3])
        mean = [r for r in history if r["task"] == "mean" and r["variant"] == variant]
        assert [m["score"] for m in mean] == [r["score"] for r in series]  # one task: the mean is that task


def lines_correct(lines, variant):
    return [line["correct"] for line in lines if line["variant"] == variant]


def test_avg_evaluation_sees_the_window_mean_and_live_weights_come_back(tmp_path):
    x, y = make_data(4)
    seen: list[dict] = []
    monitor = StabilityMonitor(
        [classify_task(x, y, seen=seen)],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
    )
    train(25, monitor)
    monitor.close()
    # seen alternates raw, avg for each snapshot.
    raws, avgs = seen[0::2], seen[1::2]
    assert len(raws) == len(avgs) == 5
    for index, averaged in enumerate(avgs):
        window = raws[max(0, index - 2) : index + 1]
        for key, value in averaged.items():
            if value.is_floating_point():
                oracle = sum(w[key].double() for w in window) / len(window)
                torch.testing.assert_close(value.double(), oracle, rtol=0, atol=1e-6)
            else:
                assert torch.equal(value, window[-1][key])
    # The buffer holds exactly the raw weights of the last three snapshots.
    for step, raw in zip((15, 20, 25), raws[2:], strict=True):
        with safe_open(str(tmp_path / "buffer" / f"step-{step:08d}.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                assert torch.equal(handle.get_tensor(key), raw[key])


def test_no_tasks_keeps_buffer_and_average_only(tmp_path):
    monitor = StabilityMonitor([], dirpath=tmp_path, window=2, every_n_steps=5, console=False)
    train(20, monitor)
    monitor.close()
    assert monitor.buffer.steps == [15, 20]
    assert monitor.average.count == 2
    assert not (tmp_path / "history.jsonl").exists() or (tmp_path / "history.jsonl").read_text() == ""
    # No scores: TensorBoard has the best run, whose one point is the final average's step, and the
    # weights' drift in the raw run.
    runs = read_runs(tmp_path / "tensorboard")
    assert runs["best"] == {"stability/best/step": [(20, 20.0)]}
    assert [line["step"] for line in monitor.history.drift()] == [5, 10, 15, 20]
    assert sorted(runs) == ["best", "raw"]
    assert_runs_match(runs, expected_runs([], window=2, drift=monitor.history.drift()))
    # Nothing to select on: the final window average is exported as the run's model.
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["path"] == "exports/step-00000020-avg" and best["score"] is None and best["steps"] == [15, 20]
    oracle = {}
    for step in (15, 20):
        with safe_open(str(tmp_path / "buffer" / f"step-{step:08d}.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                oracle[key] = (
                    oracle.get(key, 0) + tensor.double() / 2 if tensor.is_floating_point() else tensor
                )
    with safe_open(str(tmp_path / best["path"] / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            torch.testing.assert_close(
                handle.get_tensor(key).double(), oracle[key].double(), rtol=0, atol=1e-6
            )


def test_tensorboard_runs_per_variant_and_best_read_back_with_the_event_multiplexer(tmp_path):
    x, y = make_data(5)
    tasks = [classify_task(x, y, "a"), classify_task(x, y[torch.randperm(EXAMPLES)], "b")]
    monitor = StabilityMonitor(tasks, dirpath=tmp_path, window=2, every_n_steps=5, console=False)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pointers = {}  # best.json after each snapshot, read from disk
    for step in range(1, 41):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor.step(model, step) is not None and (tmp_path / "best.json").exists():
            pointers[step] = json.loads((tmp_path / "best.json").read_text())
    monitor.close()
    runs = read_runs(tmp_path / "tensorboard")
    assert sorted(runs) == ["avg", "best", "ens", "raw"]
    assert_runs_match(runs, expected_runs(monitor.history.records(), window=2, drift=monitor.history.drift()))

    # The best run: a point exactly at the snapshots where best.json changed, with its step and score.
    # (The evidence inside best.json is rewritten at every snapshot; the model changes with its identity.)
    def identity(pointer):
        return None if pointer is None else (pointer["step"], pointer["variant"], pointer["path"])

    changes = [s for s in sorted(pointers) if identity(pointers[s]) != identity(pointers.get(s - 5))]
    assert len(changes) >= 2
    assert runs["best"]["stability/best/step"] == [(s, pytest.approx(pointers[s]["step"])) for s in changes]
    assert runs["best"]["stability/best/score"] == [
        (s, pytest.approx(pointers[s]["score"], rel=1e-6)) for s in changes
    ]


def test_a_failing_task_is_recorded_and_skipped(tmp_path, caplog):
    x, y = make_data(6)

    def broken(model):
        raise RuntimeError("tokenizer exploded")

    tasks = [classify_task(x, y), FunctionTask("broken", broken, targets=[0])]
    monitor = StabilityMonitor(tasks, dirpath=tmp_path, window=2, every_n_steps=5, console=False)
    with caplog.at_level(logging.WARNING):
        train(10, monitor)
    monitor.close()
    assert len(monitor.history.records(task="cls", variant="raw")) == 2
    assert monitor.history.records(task="mean") == []  # a mean over a partial set of tasks would mislead
    errors = monitor.history.errors()
    assert {(e["phase"], e["task"], e["variant"]) for e in errors} == {
        ("evaluate", "broken", "raw"),
        ("evaluate", "broken", "avg"),
    }
    assert all("tokenizer exploded" in e["error"] for e in errors)
    assert len(errors) == 4  # every occurrence in the history: raw and avg at steps 5 and 10
    # One warning per kind (task, variant, exception type), with its cause in full; repeats are counted.
    warned = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(warned) == 2 and all("Traceback" in message for message in warned)
    times = "2 times RuntimeError: tokenizer exploded (first at step 5, last at 10)"
    assert monitor.faults.summary() == [
        f"evaluate of task 'broken' (raw): {times}",
        f"evaluate of task 'broken' (avg): {times}",
    ]

    strict = StabilityMonitor(
        tasks, dirpath=tmp_path / "strict", on_error="raise", every_n_steps=5, console=False
    )
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        train(5, strict)


def test_disk_full_skips_the_snapshot_and_training_goes_on(tmp_path, monkeypatch, caplog):
    x, y = make_data(7)
    real_write = buffer_module.atomic_write_bytes

    def disk_full_at_step_10(path, data, **options):
        if path.name == "step-00000010.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, **options)

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", disk_full_at_step_10)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    with caplog.at_level(logging.WARNING):
        model = train(20, monitor)
    monitor.close()
    assert model is not None
    assert monitor.buffer.steps == [5, 15, 20]
    errors = monitor.history.errors()
    # The avg of step 10 is skipped, saying why: the window lacks the snapshot it would be named after.
    assert [(e["step"], e["phase"]) for e in errors] == [(10, "snapshot"), (10, "average")]
    assert "No space left" in errors[0]["error"]
    # The average is the mean of what the buffer holds.
    oracle = {}
    for step in monitor.buffer.steps:
        with safe_open(str(tmp_path / "buffer" / f"step-{step:08d}.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    oracle[key] = oracle.get(key, 0) + tensor.double() / 3
    for key, value in monitor.average.mean().items():
        if key in oracle:
            torch.testing.assert_close(value.double(), oracle[key], rtol=0, atol=1e-6)

    def always_full(path, data, **options):
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(buffer_module, "atomic_write_bytes", always_full)
    strict = StabilityMonitor(
        [], dirpath=tmp_path / "strict", on_error="raise", every_n_steps=5, console=False
    )
    train(5, strict)  # the write runs in the background; its failure surfaces at the next snapshot or close
    with pytest.raises(SnapshotError, match="full") as caught:
        strict.close()
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC


def test_resume_drops_the_abandoned_trajectory(tmp_path):
    x, y = make_data(8)
    first = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    train(30, first)
    first.close()

    resumed = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    resumed.open(resume_step=20)
    # Snapshots evicted before the crash (5, 10) are gone; the window keeps what it held up to step 20.
    assert resumed.buffer.steps == [20]
    assert resumed.average.count == 1
    assert max(r["step"] for r in resumed.history.records()) == 20
    model = train(20)
    for step in (25, 30, 35):
        resumed.on_snapshot(model, step)
    resumed.close()

    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["task"], r["variant"]) for r in history]
    assert len(keys) == len(set(keys)), "no step is recorded twice"
    assert sorted({r["step"] for r in history}) == [5, 10, 15, 20, 25, 30, 35]
    assert resumed.buffer.steps == [25, 30, 35]
    manifest = json.loads((tmp_path / "buffer" / "manifest.json").read_text())
    assert [e["step"] for e in manifest["snapshots"]] == [25, 30, 35]
    assert sorted(p.name for p in (tmp_path / "buffer").glob("*.safetensors")) == [
        f"step-{s:08d}.safetensors" for s in (25, 30, 35)
    ]
    # The average restarted from what the buffer kept; the ensemble refilled its window from the
    # raw outputs in the history, so it never lost a model.
    avg = [r for r in history if r["variant"] == "avg" and r["task"] == "cls"]
    assert [r["n_models"] for r in avg] == [1, 2, 3, 3, 2, 3, 3]
    ens = [r for r in history if r["variant"] == "ens" and r["task"] == "cls"]
    assert [r["n_models"] for r in ens] == [1, 2, 3, 3, 3, 3, 3]
    lines = [json.loads(line) for line in (tmp_path / "examples" / "cls.jsonl").read_text().splitlines()]
    assert sorted(line["step"] for line in lines if line["variant"] == "raw") == [5, 10, 15, 20, 25, 30, 35]
    # TensorBoard shows one point per step in every run: the abandoned 25 and 30 were purged.
    runs = read_runs(tmp_path / "tensorboard")
    assert [step for step, _ in runs["raw"]["stability/cls/score"]] == [5, 10, 15, 20, 25, 30, 35]
    assert_runs_match(runs, expected_runs(resumed.history.records(), window=3, drift=resumed.history.drift()))


def test_an_earlier_step_is_treated_as_a_resume(tmp_path, caplog):
    x, y = make_data(9)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    model = train(20, monitor)
    with caplog.at_level(logging.WARNING):
        monitor.on_snapshot(model, 10)
    monitor.close()
    assert "resume" in caplog.text
    assert sorted({r["step"] for r in monitor.history.records()}) == [5, 10]
    assert monitor.buffer.steps == [10]  # 5 had left the window of three before step 20


def test_console_line(tmp_path, capsys):
    x, y = make_data(10)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, tensorboard=False
    )
    train(10, monitor)
    monitor.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[stability] step")]
    assert len(lines) == 2 and "step 10" in lines[1] and "avg" in lines[1]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="window"):
        StabilityConfig(window=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        StabilityConfig(every_n_steps=-5)
    with pytest.raises(ValueError, match="ensemble"):
        StabilityConfig(ensemble="median")
    with pytest.raises(ValueError, match="storage_dtype"):
        StabilityConfig(storage_dtype="int8")
    with pytest.raises(ValueError, match="on_error"):
        StabilityConfig(on_error="ignore")
    with pytest.raises(ValueError, match="horizon"):
        StabilityConfig(horizon=1)
    with pytest.raises(ValueError, match="reserved"):
        FunctionTask("mean", lambda m: [0], targets=[0])
    x, y = make_data()
    with pytest.raises(ValueError, match="unique"):
        StabilityMonitor([classify_task(x, y), classify_task(x, y)])
    with pytest.raises(ValueError, match="dirpath"):
        StabilityMonitor([]).open()
    with pytest.raises(ValueError, match="not a Task"):
        StabilityMonitor([lambda model: 0])
    assert StabilityConfig(storage_dtype="bfloat16").storage_dtype == torch.bfloat16


def test_state_dict_round_trip_restores_the_run_directory(tmp_path):
    x, y = make_data(12)
    first = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "first", every_n_steps=5, console=False
    )
    train(10, first)
    first.close()
    state = json.loads(json.dumps(first.state_dict()))  # JSON all the way: no pickle in checkpoints
    assert state["dirpath"] == str(tmp_path / "first") and state["last_step"] == 10

    second = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "elsewhere", every_n_steps=5, console=False
    )
    second.load_state_dict(state)
    second.open(resume_step=state["last_step"])
    assert second.dirpath == tmp_path / "first"
    assert second.buffer.steps == [5, 10]
    second.close()
    with pytest.raises(ValueError, match="not a StabilityMonitor state"):
        StabilityMonitor([]).load_state_dict({"foo": 1})


def test_mean_prob_ensemble_through_the_monitor(tmp_path):
    x, y = make_data(13)
    monitor = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        ensemble="mean_prob",
        console=False,
        tensorboard=False,
    )
    train(20, monitor)
    monitor.close()
    raw = monitor.history.outputs("cls", variant="raw")
    ens = monitor.history.outputs("cls", variant="ens")
    for index, line in enumerate(ens):
        window = raw[max(0, index - 2) : index + 1]
        for example in range(EXAMPLES):
            probabilities = [0.0] * 4
            for snapshot in window:
                row = torch.tensor(snapshot["choice_logprobs"][example], dtype=torch.float64)
                for choice, p in enumerate(torch.softmax(row, dim=0).tolist()):
                    probabilities[choice] += p / len(window)
            assert line["outputs"][example] == max(range(4), key=lambda c: (probabilities[c], -c))
    with pytest.raises(ValueError, match="mean_prob"):
        StabilityMonitor(
            [FunctionTask("g", lambda m: ["a"], targets=["a"], kind="generation")], ensemble="mean_prob"
        )


def test_close_writes_the_report_whose_table_holds_the_history(tmp_path):
    x, y = make_data(5)
    monitor = StabilityMonitor(
        [classify_task(x, y, "a")], dirpath=tmp_path, window=2, every_n_steps=5, console=False
    )
    train(20, monitor)
    monitor.close()
    report = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "scores-a.png").stat().st_size > 0
    # The whole-run raw score of task a, as the table prints it, from history.jsonl read by hand.
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    raw = [r["score"] for r in lines if r["task"] == "a" and r["variant"] == "raw"]
    assert len(raw) == 4
    assert f"{sum(raw) / len(raw):.4f}" in report


def test_report_setting_and_report_faults_never_stop_training(tmp_path, monkeypatch, caplog):
    x, y = make_data(5)
    quiet = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "off", every_n_steps=5, console=False, report=False
    )
    train(10, quiet)
    quiet.close()
    assert not (tmp_path / "off" / "report").exists()

    def broken(run_dir, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("checkpoint_stability.reporting.report.write_report", broken)
    faulty = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "full", every_n_steps=5, console=False
    )
    train(10, faulty)
    with caplog.at_level(logging.WARNING):
        faulty.close()
    assert "report failed" in caplog.text and "No space left" in caplog.text
    errors = [json.loads(line) for line in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert any(line.get("phase") == "report" for line in errors)

    def no_matplotlib(run_dir, **_):
        raise ImportError("the report needs matplotlib: pip install checkpoint-stability[report]")

    monkeypatch.setattr("checkpoint_stability.reporting.report.write_report", no_matplotlib)
    bare = StabilityMonitor([classify_task(x, y)], dirpath=tmp_path / "bare", every_n_steps=5, console=False)
    train(10, bare)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        bare.close()
    assert "pip install checkpoint-stability[report]" in caplog.text


def test_the_monitor_as_a_context_manager_closes_or_abandons(tmp_path):
    from checkpoint_stability.storage.run_lock import RunLock

    x, y = make_data(9)
    with StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "ok", window=3, every_n_steps=5, console=False
    ) as monitor:
        train(10, monitor)
    assert monitor.best is not None and monitor.best_model_path.is_dir()  # close() exported the best
    RunLock(tmp_path / "ok").release()  # and let the directory go

    with (
        pytest.raises(RuntimeError, match="diverged"),
        StabilityMonitor([], dirpath=tmp_path / "failed", window=3, every_n_steps=5, console=False) as failed,
    ):
        train(10, failed)
        raise RuntimeError("diverged")
    assert failed.buffer.steps == [5, 10]  # the write in flight finished
    assert not (tmp_path / "failed" / "exports").exists()  # abandon() exports nothing
    RunLock(tmp_path / "failed").release()


def test_a_fresh_monitor_refuses_another_runs_directory_until_told_to_overwrite(tmp_path):
    x, y = make_data(11)
    first = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, console=False
    )
    train(10, first)
    first.close()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock.json"}
    fresh = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, console=False
    )
    with pytest.raises(ExistingRunError, match=r"history\.jsonl with 12 records up to step 10"):
        fresh.step(train(5), 5)  # the lazy open at the first snapshot refuses, whatever on_error says
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock.json"} == before
    replacing = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, console=False, overwrite=True
    )
    train(5, replacing)
    replacing.close()
    assert sorted({r["step"] for r in replacing.history.records()}) == [5]
    assert [p.name for p in (tmp_path / "buffer").glob("*.safetensors")] == ["step-00000005.safetensors"]
