"""One run per run directory: a second live run is refused, a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny_training import classify_task, make_data, train

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.storage.run_lock import LOCK_FILE, RunDirectoryLocked, RunLock


def monitor(dirpath, **settings) -> StabilityMonitor:
    x, y = make_data(3)
    return StabilityMonitor(
        [classify_task(x, y)], dirpath=dirpath, every_n_steps=5, console=False, **settings
    )


def test_a_second_run_in_the_same_directory_is_refused_and_the_first_goes_on(tmp_path):
    first = monitor(tmp_path)
    train(5, first)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()

    with pytest.raises(
        RuntimeError, match=rf"in use by another run \(pid {os.getpid()} on .*\).*another dirpath"
    ):
        monitor(tmp_path, on_error="raise").try_open(resume_step=None)
    with pytest.warns(UserWarning, match="in use by another run"):
        assert monitor(tmp_path).try_open(resume_step=None) is False

    train(10, first)  # the refused runs changed nothing of the first one's
    first.close()
    steps = sorted({r["step"] for r in first.history.records()})
    assert steps == [5, 10]
    # Closed: the directory is free again.
    second = monitor(tmp_path)
    second.open(resume_step=10)
    second.close()


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    holder = textwrap.dedent(
        f"""
        import sys, time
        from checkpoint_stability.storage.run_lock import RunLock
        lock = RunLock({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryLocked, match=f"pid {process.pid}"):
            RunLock(tmp_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The file is still there, naming the dead process; the lock itself went with it.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == process.pid
    lock = RunLock(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_monitor_dropped_without_close_frees_its_directory(tmp_path):
    abandoned = monitor(tmp_path)
    train(5, abandoned)
    abandoned.buffer.wait()
    del abandoned  # no close(): as when a script forgets it; the lock must not outlive the object
    resumed = monitor(tmp_path)
    resumed.open(resume_step=5)
    resumed.close()


def test_a_symlinked_lock_file_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        RunLock(run_dir)
    assert outside.read_text() == "keep me"
