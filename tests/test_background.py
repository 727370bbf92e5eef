"""Background evaluation: the training side only snapshots, an evaluator in another thread or process
follows the run directory and writes what an inline run writes — compared line for line with one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_training import Net, classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.evaluator import BackgroundEvaluator, NotBackgroundRunError
from checkpoint_stability.evaluator_state import read_evaluator_state
from checkpoint_stability.storage.run_lock import RunDirectoryLocked

TESTS = Path(__file__).resolve().parent

# An evaluator in its own process: run dir, tests dir, timeout[, seconds per evaluation]; prints its
# FollowResult as JSON.
CHILD = textwrap.dedent(
    """
    import dataclasses, json, os, sys, time
    sys.path.insert(0, sys.argv[2])
    from tiny_training import Net, classify_task, make_data
    from checkpoint_stability.evaluator import BackgroundEvaluator
    timeout = float(sys.argv[3])
    while not os.path.exists(os.path.join(sys.argv[1], "run.json")):
        time.sleep(0.01)
    x, y = make_data(6)
    task = classify_task(x, y)
    if len(sys.argv) > 4:  # seconds each evaluation takes, so that a kill can land mid-run
        evaluate, delay = task.evaluate, float(sys.argv[4])
        task.evaluate = lambda model: (time.sleep(delay), evaluate(model))[1]
    evaluator = BackgroundEvaluator(sys.argv[1], [task], Net(), console=False, poll_interval=0.01)
    print(json.dumps(dataclasses.asdict(evaluator.run(timeout=timeout))))
    """
)


def lines(path: Path, drop=("time",)) -> list[dict]:
    if not path.exists():
        return []
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()
    ]


def inline_run(run_dir, x, y, steps=40, **settings):
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=run_dir, window=3, every_n_steps=5, console=False, **settings
    )
    train(steps, monitor)
    monitor.close()
    return monitor


def background_training(run_dir, steps=40, **settings):
    monitor = StabilityMonitor(
        [], dirpath=run_dir, window=3, every_n_steps=5, console=False, evaluation="background", **settings
    )
    train(steps, monitor)
    monitor.close()
    return monitor


def assert_same_results(inline: Path, background: Path) -> None:
    for name in ("history.jsonl", "examples/cls.jsonl", "examples/cls.meta.json", "drift.jsonl"):
        assert lines(inline / name) == lines(background / name), name
    best = json.loads((inline / "best.json").read_text())
    assert json.loads((background / "best.json").read_text()) == best
    path = f"{best['path']}/model.safetensors"
    with safe_open(inline / path, "pt") as left, safe_open(background / path, "pt") as right:
        assert sorted(left.keys()) == sorted(right.keys())
        assert all(torch.equal(left.get_tensor(k), right.get_tensor(k)) for k in left.keys())


def test_the_training_side_only_snapshots_and_the_evaluator_writes_what_inline_writes(tmp_path, capsys):
    x, y = make_data(3)
    inline_run(tmp_path / "inline", x, y)
    trainer = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path / "bg", window=3, every_n_steps=5, evaluation="background"
    )
    train(40, trainer)
    trainer.close()
    printed = capsys.readouterr().out
    assert "this process only snapshots" in printed and "at most 6 snapshot files" in printed
    # Nothing was evaluated in training: no history, and every snapshot waits in the buffer for the
    # evaluator, which has not started (window 3 + max_pending 3: the 2 oldest were dropped).
    assert not (tmp_path / "bg" / "history.jsonl").exists()
    manifest = json.loads((tmp_path / "bg" / "buffer" / "manifest.json").read_text())
    assert [e["step"] for e in manifest["pending"]] == [15, 20, 25]
    assert [e["step"] for e in manifest["snapshots"]] == [30, 35, 40]
    assert manifest["dropped"] == [5, 10]
    run = json.loads((tmp_path / "bg" / "run.json").read_text())
    assert run["evaluation"] == "background" and run["closed"] is True and run["last_step"] == 40


def test_records_examples_drift_best_and_export_equal_an_inline_run(tmp_path):
    x, y = make_data(3)
    inline_run(tmp_path / "inline", x, y)
    background_training(tmp_path / "bg", max_pending=10)
    result = BackgroundEvaluator(tmp_path / "bg", [classify_task(x, y)], Net(), console=False).run(timeout=0)
    assert result.evaluated == [5, 10, 15, 20, 25, 30, 35, 40] and result.skipped == [] and result.closed
    assert_same_results(tmp_path / "inline", tmp_path / "bg")
    state = read_evaluator_state(tmp_path / "bg")
    assert (state.consumed, state.window, state.needed_from) == (40, [30, 35, 40], 30)


def test_the_evaluator_follows_a_run_while_it_trains(tmp_path):
    x, y = make_data(6)
    inline_run(tmp_path / "inline", x, y)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # Another process, as in use (an evaluator thread would share, and rewind, training's RNG). It
    # starts before training does: it waits for run.json, then follows the snapshots as they come.
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "bg"), str(TESTS), "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    background_training(tmp_path / "bg", max_pending=10)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["closed"] and result["evaluated"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert len(result["lags"]) == 8 and all(lag >= 0 for lag in result["lags"])
    assert_same_results(tmp_path / "inline", tmp_path / "bg")


def test_a_second_evaluator_is_refused_naming_the_first(tmp_path):
    background_training(tmp_path)
    x, y = make_data(0)
    first = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=3, every_n_steps=5, follower=True, console=False
    )
    first.open(resume_step=-1, model=Net())
    try:
        with pytest.raises(
            RunDirectoryLocked, match=rf"already being evaluated by another evaluator \(pid {os.getpid()}"
        ):
            BackgroundEvaluator(tmp_path, [classify_task(x, y)], Net(), console=False).run(timeout=0)
    finally:
        first.abandon()


def test_an_inline_run_directory_is_not_followed(tmp_path):
    x, y = make_data(0)
    inline_run(tmp_path, x, y, steps=10)
    with pytest.raises(NotBackgroundRunError, match="evaluation='background'"):
        BackgroundEvaluator(tmp_path, [classify_task(x, y)], Net())


def test_a_lagging_evaluator_records_the_gap_and_averages_what_is_on_disk(tmp_path):
    x, y = make_data(5)
    background_training(tmp_path, max_pending=1)  # window 3 + 1 pending: steps 5..20 are dropped
    result = BackgroundEvaluator(tmp_path, [classify_task(x, y)], Net(), console=False).run(timeout=0)
    assert result.skipped == [5, 10, 15, 20] and result.evaluated == [25, 30, 35, 40]
    errors = [line for line in lines(tmp_path / "history.jsonl") if "error" in line]
    assert [(e["step"], e["phase"]) for e in errors] == [(s, "skipped") for s in (5, 10, 15, 20)]
    assert all("max_pending=1" in e["error"] for e in errors)
    records = [r for r in lines(tmp_path / "history.jsonl") if "error" not in r]
    assert sorted({r["step"] for r in records}) == [25, 30, 35, 40]
    # Its average is the float64 mean of the files of its window (the last 3 it evaluated).
    avg = [r for r in records if r["variant"] == "avg" and r["task"] == "cls"]
    assert [r["n_models"] for r in avg] == [1, 2, 3, 3]

    # Its running average is the float64 mean of the files of its window: the drift from it at step 40,
    # recomputed from the buffered files.
    def flat(step):
        with safe_open(tmp_path / "buffer" / f"step-{step:08d}.safetensors", "pt") as handle:
            return torch.cat(
                [
                    handle.get_tensor(k).double().reshape(-1)
                    for k in sorted(handle.keys())
                    if handle.get_tensor(k).is_floating_point()
                ]
            )

    now = flat(40)
    mean = (flat(30) + flat(35) + now) / 3
    drift = {line["step"]: line for line in lines(tmp_path / "drift.jsonl")}
    assert drift[40]["n_models"] == 3
    assert drift[40]["average"] == pytest.approx(float((now - mean).norm() / now.norm()), rel=1e-5)
    assert drift[25]["previous"] is None  # nothing evaluated before it: no previous snapshot


def kill_and_restart(tmp_path, trials: int, seed: int) -> None:
    """Kill the evaluator ``trials`` times at random moments (seeded), restart it to the end, and check
    that every step has its records exactly once."""
    x, y = make_data(6)
    background_training(tmp_path / "bg", steps=60, max_pending=20)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(seed)
    reached: list[int | None] = []  # the last acknowledged step at each kill
    for _ in range(trials):
        before = read_evaluator_state(tmp_path / "bg")
        child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "bg"), str(TESTS), "0", "0.1"])
        # Once it has made progress (whatever the load), at a random moment of the next snapshot's work.
        while child.poll() is None and read_evaluator_state(tmp_path / "bg") == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = read_evaluator_state(tmp_path / "bg")
        reached.append(None if state is None else state.consumed)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "bg"), str(TESTS), "0"], timeout=300, check=False
    )
    assert done.returncode == 0
    print(f"kill -9 of the evaluator: acknowledged step at each kill {reached}")
    # The kills landed mid-run, not only before or after the work (else this would test nothing).
    assert any(step is not None and step < 60 for step in reached), reached
    records = [r for r in lines(tmp_path / "bg" / "history.jsonl") if "error" not in r]
    keys = [(r["step"], r["task"], r["variant"]) for r in records]
    assert len(keys) == len(set(keys)), "a record was written twice"
    assert sorted({r["step"] for r in records}) == list(range(5, 61, 5))
    assert {(t, v) for _, t, v in keys} == {(t, v) for t in ("cls", "mean") for v in ("raw", "avg", "ens")}
    examples = [(e["step"], e["variant"]) for e in lines(tmp_path / "bg" / "examples" / "cls.jsonl")]
    assert len(examples) == len(set(examples)) == 36
    # Raw results do not depend on the average, so they equal an inline run's whatever the kills did.
    inline_run(tmp_path / "inline", x, y, steps=60)
    raw = [r for r in records if r["variant"] == "raw"]
    assert raw == [r for r in lines(tmp_path / "inline" / "history.jsonl") if r["variant"] == "raw"]


def test_an_evaluator_killed_at_random_moments_goes_on_without_a_duplicate_or_missing_record(tmp_path):
    kill_and_restart(tmp_path, trials=3, seed=0)


@pytest.mark.soak
def test_soak_an_evaluator_killed_twelve_times(tmp_path):
    kill_and_restart(tmp_path, trials=12, seed=1)


def test_a_trainer_resumed_from_an_earlier_step_makes_the_evaluator_drop_what_came_after(tmp_path):
    x, y = make_data(7)

    def run(run_dir, **settings):
        first = StabilityMonitor(
            [classify_task(x, y)], dirpath=run_dir, window=3, every_n_steps=5, console=False, **settings
        )
        train(40, first)
        first.close()
        resumed = StabilityMonitor(
            [classify_task(x, y)], dirpath=run_dir, window=3, every_n_steps=5, console=False, **settings
        )
        resumed.open(resume_step=20)
        model = train(20, seed=1)  # another trajectory from step 20 on
        for step in (25, 30, 35, 40):
            resumed.on_snapshot(model, step)
        resumed.close()

    run(tmp_path / "inline")
    bg = tmp_path / "bg"
    first = StabilityMonitor(
        [], dirpath=bg, window=3, every_n_steps=5, console=False, evaluation="background", max_pending=20
    )
    train(40, first)
    first.close()
    BackgroundEvaluator(bg, [classify_task(x, y)], Net(), console=False).run(timeout=0)
    resumed = StabilityMonitor(
        [], dirpath=bg, window=3, every_n_steps=5, console=False, evaluation="background", max_pending=20
    )
    resumed.open(resume_step=20)
    model = train(20, seed=1)
    for step in (25, 30, 35, 40):
        resumed.on_snapshot(model, step)
    resumed.close()
    result = BackgroundEvaluator(bg, [classify_task(x, y)], Net(), console=False).run(timeout=0)
    assert result.evaluated == [25, 30, 35, 40]
    history = lines(bg / "history.jsonl")
    keys = [(r["step"], r["task"], r["variant"]) for r in history]
    assert len(keys) == len(set(keys)), "a record was written twice"
    inline = lines(tmp_path / "inline" / "history.jsonl")
    # What came before the resume is kept as it was, what came after is the new trajectory's: its raw
    # records equal the inline run's (they do not depend on the average).
    assert [r for r in history if r["step"] <= 20] == [r for r in inline if r["step"] <= 20]
    assert [r for r in history if r["variant"] == "raw"] == [r for r in inline if r["variant"] == "raw"]
    # The inline run had already deleted the files before step 30 when it resumed, so its average
    # restarted from one model; the evaluator's were still on disk (it had not consumed them when
    # training went on), so its average at step 25 holds the window 15, 20, 25 as if nothing happened.
    avg = {r["step"]: r["n_models"] for r in history if r["variant"] == "avg" and r["task"] == "cls"}
    assert [avg[s] for s in (25, 30, 35, 40)] == [3, 3, 3, 3]
    assert [
        r["n_models"] for r in inline if r["variant"] == "avg" and r["task"] == "cls" and r["step"] > 20
    ] == [
        1,
        2,
        3,
        3,
    ]


def test_a_trainer_that_died_leaves_the_run_not_closed_and_the_evaluator_finishes_what_is_on_disk(tmp_path):
    x, y = make_data(8)
    trainer = StabilityMonitor(
        [],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        console=False,
        evaluation="background",
        max_pending=10,
    )
    train(20, trainer)
    trainer.abandon()  # as a crash leaves it: the lock let go, run.json not closed
    assert json.loads((tmp_path / "run.json").read_text())["closed"] is False
    result = BackgroundEvaluator(tmp_path, [classify_task(x, y)], Net(), console=False).run()  # no timeout
    assert result.evaluated == [5, 10, 15, 20] and result.closed is False


def test_a_corrupt_snapshot_file_is_skipped_with_an_error_line_as_inline(tmp_path):
    x, y = make_data(9)
    background_training(tmp_path, max_pending=10)
    path = tmp_path / "buffer" / "step-00000015.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: the checksum no longer matches
    path.write_bytes(bytes(data))
    result = BackgroundEvaluator(tmp_path, [classify_task(x, y)], Net(), console=False).run(timeout=0)
    assert result.evaluated == [5, 10, 15, 20, 25, 30, 35, 40]  # consumed, 15 without records
    history = lines(tmp_path / "history.jsonl")
    errors = [e for e in history if "error" in e]
    assert [(e["step"], e["phase"]) for e in errors] == [(15, "snapshot")]
    assert "checksum does not match" in errors[0]["error"]
    assert sorted({r["step"] for r in history if "error" not in r}) == [5, 10, 20, 25, 30, 35, 40]


def test_an_evaluator_following_live_drops_what_came_after_a_trainer_resume(tmp_path):
    """The trainer crashes and resumes from an earlier step while the evaluator follows it (in a thread:
    training here draws no random numbers, so sharing the process cannot change it)."""
    import threading

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist(), kind="multiple_choice")

    def trained(model, steps, start=0, lr=0.1):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for step in range(start + 1, start + steps + 1):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            yield step

    settings = dict(window=3, every_n_steps=5, console=False, evaluation="background", max_pending=20)
    model = torch.nn.Linear(6, 4)
    first = StabilityMonitor([], dirpath=tmp_path, **settings)
    results = []
    for step in trained(model, 20):
        first.step(model, step)
    follower = BackgroundEvaluator(tmp_path, [task], torch.nn.Linear(6, 4), console=False, poll_interval=0.01)
    at_20 = {k: v.clone() for k, v in model.state_dict().items()}
    thread = threading.Thread(target=lambda: results.append(follower.run(timeout=30)))
    thread.start()
    for step in trained(model, 20, start=20):
        first.step(model, step)
    while getattr(read_evaluator_state(tmp_path), "consumed", None) != 40:
        time.sleep(0.01)
    first.abandon()  # a crash at step 40; the trainer comes back at once from its step-20 checkpoint
    resumed = StabilityMonitor([], dirpath=tmp_path, **settings)
    resumed.open(resume_step=20)
    model.load_state_dict(at_20)
    for step in trained(model, 20, start=20, lr=0.05):  # another trajectory after the resume
        resumed.step(model, step)
    resumed.close()
    thread.join(timeout=120)
    assert results and results[0].closed
    assert results[0].evaluated == [5, 10, 15, 20, 25, 30, 35, 40, 25, 30, 35, 40]
    history = lines(tmp_path / "history.jsonl")
    keys = [(r["step"], r["task"], r["variant"]) for r in history]
    assert len(keys) == len(set(keys)), "a record was written twice"
    assert sorted({r["step"] for r in history}) == [5, 10, 15, 20, 25, 30, 35, 40]
    # The records after step 20 are the second trajectory's: its raw step-40 score, computed here.
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).double().mean().item()
    raw_40 = next(r for r in history if (r["step"], r["task"], r["variant"]) == (40, "cls", "raw"))
    assert raw_40["score"] == pytest.approx(expected, abs=1e-12)


def test_a_sharded_run_is_put_together_from_every_ranks_files(tmp_path):
    """FSDP2 under torchrun (2 CPU ranks): each rank buffers its own shards; one evaluator process puts
    the full tensors together from both ranks' files, as the manifests' layout says."""
    from test_distributed import torchrun

    from checkpoint_stability.followed_buffer import FollowedBuffer

    torchrun("background_fsdp2.py", tmp_path)
    saved = json.loads((tmp_path / "states.json").read_text())
    states = [{k: torch.tensor(v) for k, v in state.items()} for state in saved["states"]]
    x, y = torch.tensor(saved["x"]), torch.tensor(saved["y"])
    run = tmp_path / "run"
    shards = [run / "buffer" / f"rank-{r}" for r in (0, 1)]
    # Every buffered step, put together, is the gathered model of that step, exactly.
    followed = FollowedBuffer(shards[0], 3, shards=shards)
    entries, _ = followed.unconsumed(None)
    assert [e.step for e in entries] == [1, 2, 3, 4, 5]
    for entry, state in zip(entries, states, strict=True):
        full = followed.load(entry)
        assert sorted(full.tensors) == sorted(state)
        assert all(torch.equal(full[k], state[k]) for k in state)

    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())
    result = BackgroundEvaluator(run, [task], model, console=False).run(timeout=0)
    assert result.evaluated == [1, 2, 3, 4, 5] and result.closed
    history = lines(run / "history.jsonl")
    for step, state in enumerate(states, start=1):
        model.load_state_dict(state)
        with torch.no_grad():
            expected = (model(x).argmax(-1) == y).double().mean().item()
        raw = next(r for r in history if (r["step"], r["task"], r["variant"]) == (step, "cls", "raw"))
        assert raw["score"] == pytest.approx(expected, abs=1e-12)
    # Its window average is the float64 mean of the gathered weights of the window.
    best = json.loads((run / "best.json").read_text())
    with safe_open(run / best["path"] / "model.safetensors", "pt") as handle:
        window = [states[s - 1] for s in best["steps"]]
        for key in handle.keys():
            mean = sum(state[key].double() for state in window) / len(window)
            want = mean if best["variant"] == "avg" else states[best["step"] - 1][key].double()
            torch.testing.assert_close(handle.get_tensor(key).double(), want, rtol=0, atol=1e-6)


def test_an_evaluator_under_torchrun_follows_each_ranks_shards_and_equals_inline(tmp_path):
    """FSDP2 on 2 CPU ranks: the evaluator itself runs on the two ranks, each reading its own shard
    files and averaging them locally, and evaluates collectively, as inline sharded evaluation does."""
    from test_distributed import torchrun

    torchrun("background_fsdp2_follow.py", tmp_path)
    assert_same_results(tmp_path / "inline", tmp_path / "bg")
    assert read_evaluator_state(tmp_path / "bg").consumed == 8
