"""``checkpoint-stability follow``: the background evaluator from the command line, on real runs.

Oracle: an inline run of the same training, which evaluates in the training process. What the command
writes into a background run's directory must equal what that inline run wrote, line for line (the
wall-clock ``time`` aside), and the exported weights must be the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_training import classify_task, make_data, train

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.offline.cli import main
from checkpoint_stability.storage.run_lock import EVALUATOR_LOCK_FILE, RunLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = list(range(5, 41, 5))  # every_n_steps=5 over 40 training steps

FOLLOW_MODULE = '''
"""Tasks and model for the follow tests: the tiny classifier of tiny_training."""
import torch
from tiny_training import Net, classify_task, make_data


def build():
    x, y = make_data(3)
    return [classify_task(x, y)]


def model():
    return Net()


def wrong_model():
    return torch.nn.Linear(6, 4)


def not_a_model():
    return "Net"
'''

SUMMARY = re.compile(
    r"followed (?P<run>\S+): evaluated (?P<n>\d+) snapshots? \(steps? (?P<first>\d+)(\.\.(?P<last>\d+))?\), "
    r"skipped (?P<k>\d+) dropped ones?(?: \(steps [^)]*\))?; training (?P<closed>closed|not closed)[^;]*; "
    r"lag median (?P<median>\d+\.\d\d) s, max (?P<max>\d+\.\d\d) s$"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run several times faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def follow_module(tmp_path, monkeypatch):
    """follow_tasks.py in the working directory, importable as --tasks follow_tasks:build; fresh per test."""
    (tmp_path / "follow_tasks.py").write_text(FOLLOW_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory
    monkeypatch.delitem(sys.modules, "follow_tasks", raising=False)
    yield
    sys.modules.pop("follow_tasks", None)


@pytest.fixture(scope="module")
def inline_dir(tmp_path_factory) -> Path:
    """The oracle: the same training, evaluated inline."""
    run_dir = tmp_path_factory.mktemp("inline") / "stability"
    x, y = make_data(3)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=run_dir, window=3, every_n_steps=5, console=False
    )
    train(40, monitor)
    monitor.close()
    return run_dir


def background_run(run_dir: Path, *, close: bool = True, **settings) -> StabilityMonitor:
    """The training side of a background run: snapshots only (closed unless ``close=False``)."""
    monitor = StabilityMonitor(
        [], dirpath=run_dir, window=3, every_n_steps=5, evaluation="background", console=False, **settings
    )
    train(40, monitor)
    if close:
        monitor.close()
    return monitor


FOLLOW = [
    "--tasks",
    "follow_tasks:build",
    "--model",
    "follow_tasks:model",
    "--timeout",
    "0",
    "--poll",
    "0.01",
]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines(path: Path, drop=("time",)) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()
    ]


def buffered_steps(run_dir: Path) -> list[int]:
    """The steps whose snapshot files the trainer left in the buffer (its window and the pending ones)."""
    return sorted(
        int(path.stem.removeprefix("step-")) for path in (run_dir / "buffer").glob("step-*.safetensors")
    )


def summary(stdout: str) -> re.Match:
    last = stdout.strip().splitlines()[-1]
    match = SUMMARY.fullmatch(last)
    assert match, last
    return match


def assert_same_as_inline(run_dir: Path, inline_dir: Path) -> None:
    for name in ("history.jsonl", "examples/cls.jsonl", "drift.jsonl"):
        assert lines(run_dir / name) == lines(inline_dir / name), name
    best = json.loads((run_dir / "best.json").read_text())
    assert best == json.loads((inline_dir / "best.json").read_text())
    # The same weights, bit for bit, and the same metadata (whose order in the header may differ).
    with (
        safe_open(run_dir / best["path"] / "model.safetensors", "pt") as ours,
        safe_open(inline_dir / best["path"] / "model.safetensors", "pt") as theirs,
    ):
        assert ours.metadata() == theirs.metadata()
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for name in ours.keys():
            assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name)), name


# ------------------------------------------------------------------------------------------------ follow


def test_follow_writes_what_an_inline_run_writes(tmp_path, follow_module, inline_dir, capsys):
    run_dir = tmp_path / "bg"
    # A bound above the 8 snapshots: with no evaluator running during training, none is dropped.
    background_run(run_dir, max_pending=20)
    assert buffered_steps(run_dir) == STEPS
    assert not (run_dir / "history.jsonl").exists() or not lines(run_dir / "history.jsonl")

    code, out, err = run(["follow", run_dir, *FOLLOW, "--quiet"], capsys)

    assert code == 0, err
    assert out.strip().splitlines() == [out.strip().splitlines()[-1]]  # --quiet: the summary alone
    # --quiet lasts as long as the command: the library's notes show again in this process afterwards.
    assert logging.getLogger("checkpoint_stability").getEffectiveLevel() < logging.WARNING
    match = summary(out)
    assert (match["run"], match["n"], match["first"], match["last"]) == (str(run_dir), "8", "5", "40")
    assert (match["k"], match["closed"]) == ("0", "closed")
    assert float(match["median"]) <= float(match["max"])
    records = lines(run_dir / "history.jsonl")
    assert sorted({r["step"] for r in records}) == STEPS
    assert {(r["variant"], r["step"]) for r in records} >= {
        (v, s) for v in ("raw", "avg", "ens") for s in STEPS
    }
    assert_same_as_inline(run_dir, inline_dir)
    assert json.loads((run_dir / "evaluator.json").read_text())["consumed"] == 40


def test_follow_prints_each_snapshot_unless_quiet(tmp_path, follow_module, capsys):
    run_dir = tmp_path / "bg"
    background_run(run_dir, max_pending=20)
    code, out, err = run(["follow", run_dir, *FOLLOW], capsys)
    assert code == 0, err
    shown = out.strip().splitlines()
    assert len(shown) > 8, out  # a console line per snapshot, the end-of-run summary, then ours
    assert summary(out)["n"] == "8"


def test_follow_reports_snapshots_the_trainer_dropped(tmp_path, follow_module, capsys):
    run_dir = tmp_path / "bg"
    # The default bound (max_pending = window = 3): 8 snapshots and nobody evaluating, so the trainer
    # keeps 6 files and drops the two oldest.
    background_run(run_dir)
    buffered = buffered_steps(run_dir)
    dropped = [s for s in STEPS if s not in buffered]
    assert dropped, buffered

    code, out, err = run(["follow", run_dir, *FOLLOW, "--quiet"], capsys)

    assert code == 0, err
    match = summary(out)
    assert int(match["n"]) == len(buffered) and int(match["k"]) == len(dropped)
    assert (match["first"], match["last"]) == (str(buffered[0]), str(buffered[-1]))
    assert f"(steps {', '.join(map(str, dropped))})" in out
    history = lines(run_dir / "history.jsonl")
    assert sorted({r["step"] for r in history if "error" not in r}) == buffered
    assert sorted(r["step"] for r in history if r.get("phase") == "skipped") == dropped


def test_follow_stops_at_timeout_while_training_runs_and_a_rerun_goes_on(
    tmp_path, follow_module, inline_dir, capsys
):
    run_dir = tmp_path / "bg"
    trainer = background_run(run_dir, close=False, max_pending=20)  # still "training": holds its lock

    code, out, err = run(["follow", run_dir, *FOLLOW, "--quiet"], capsys)
    assert code == 0, err
    match = summary(out)
    assert (match["n"], match["closed"]) == ("8", "not closed")
    assert "rerun follow to go on" in out

    trainer.close()
    code, out, err = run(["follow", run_dir, *FOLLOW, "--quiet"], capsys)
    assert code == 0, err
    # Nothing new to evaluate: no steps and no lag to show.
    assert (
        out.strip() == f"followed {run_dir}: evaluated 0 snapshots, skipped 0 dropped ones; training closed"
    )
    assert_same_as_inline(run_dir, inline_dir)


# ------------------------------------------------------------------------------------------------ refusals


def test_follow_refuses_a_run_that_is_not_background(tmp_path, follow_module, inline_dir, capsys):
    code, out, err = run(["follow", inline_dir, *FOLLOW], capsys)
    assert code == 2 and out == ""
    assert err.startswith("checkpoint-stability follow: error: ")
    assert "not a background-evaluated run" in err and "evaluated inline" in err
    assert "evaluation='background'" in err
    assert len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["follow", empty, *FOLLOW], capsys)
    assert code == 2 and "not a background-evaluated run directory (no readable run.json)" in err

    code, _, err = run(["follow", inline_dir.parent, *FOLLOW], capsys)
    assert code == 2 and f"did you mean {inline_dir}?" in err

    code, _, err = run(["follow", tmp_path / "missing", *FOLLOW], capsys)
    assert code == 2 and f"no directory {tmp_path / 'missing'}" in err
    assert not (tmp_path / "missing").exists()


def test_follow_wants_exactly_one_of_model_and_model_config(tmp_path, follow_module, capsys):
    run_dir = tmp_path / "bg"
    background_run(run_dir, max_pending=20)
    tasks = ["--tasks", "follow_tasks:build", "--timeout", "0"]

    code, _, err = run(["follow", run_dir, *tasks], capsys)
    assert code == 2 and "no model: pass --model MODULE:FUNCTION" in err and "--model-config DIR" in err

    both = [*tasks, "--model", "follow_tasks:model", "--model-config", tmp_path]
    code, _, err = run(["follow", run_dir, *both], capsys)
    assert code == 2 and "either --model MODULE:FUNCTION or --model-config DIR, not both" in err

    code, _, err = run(["follow", run_dir, "--model", "follow_tasks:model", "--timeout", "0"], capsys)
    assert code == 2 and "no tasks: pass --tasks MODULE:FUNCTION" in err

    for flag, value, message in [
        ("--timeout", "-1", "--timeout must be a number of seconds >= 0"),
        ("--poll", "0", "--poll must be a number of seconds > 0"),
        ("--device", "nonsense", "--device nonsense: "),
    ]:
        code, _, err = run(["follow", run_dir, *tasks, "--model", "follow_tasks:model", flag, value], capsys)
        assert code == 2 and message in err, err
    assert not (run_dir / "history.jsonl").exists() or not lines(run_dir / "history.jsonl")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("follow_tasks:missing", "--model follow_tasks:missing: follow_tasks has no function 'missing'"),
        ("no_such_module:model", "--model: cannot import 'no_such_module'"),
        ("follow_tasks", "--model wants MODULE:FUNCTION"),
        ("follow_tasks:not_a_model", "not_a_model() returned str, not a torch.nn.Module"),
        ("follow_tasks:wrong_model", "builds a model the snapshots do not fit: the snapshot of step 5"),
    ],
)
def test_follow_names_a_bad_model(tmp_path, follow_module, model, message, capsys):
    run_dir = tmp_path / "bg"
    background_run(run_dir, max_pending=20)
    argv = ["follow", run_dir, "--tasks", "follow_tasks:build", "--model", model, "--timeout", "0"]
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    # Refused without leaving the run directory held: a right command goes on as if nothing happened.
    code, out, err = run(["follow", run_dir, *FOLLOW, "--quiet"], capsys)
    assert code == 0, err
    assert summary(out)["n"] == "8"


def test_a_second_evaluator_is_refused_naming_the_first(tmp_path, follow_module, capsys):
    run_dir = tmp_path / "bg"
    background_run(run_dir, max_pending=20)
    first = RunLock(run_dir, EVALUATOR_LOCK_FILE)  # what a running evaluator holds
    try:
        code, out, err = run(["follow", run_dir, *FOLLOW], capsys)
    finally:
        first.release()
    assert code == 2 and out == ""
    assert "is already being evaluated by another evaluator" in err
    assert f"pid {os.getpid()} on " in err
    assert not (run_dir / "history.jsonl").exists() or not lines(run_dir / "history.jsonl")


# ------------------------------------------------------------------------------------------------ help


def test_follow_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "follow" in out and "checkpoint-stability follow runs/exp/stability --tasks" in out
    assert main(["follow", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "usage: checkpoint-stability follow RUN_DIR "
        "(--tasks MODULE:FUNCTION | --text FILE | --lm-eval NAMES ...)\n"
        "           (--model MODULE:FUNCTION | --model-config DIR)"
    )
    text = " ".join(out.split())
    assert "evaluation='background'" in text and "off the training path" in text
    for option in (
        "--model ",
        "--model-config",
        "--device",
        "--timeout",
        "--poll",
        "--export-prefix",
        "--quiet",
    ):
        assert option in out, option


# ------------------------------------------------------------------------------------------- --model-config


def gpt2_training(monitor: StabilityMonitor, steps: int = 3) -> None:
    """A tiny GPT-2 whose weights drift each step (a stand-in for training), snapshotted every step."""
    from tiny_lm import tiny_gpt2

    model = tiny_gpt2(0).train()
    noise = torch.Generator().manual_seed(7)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=noise) * 0.2)
        monitor.step(model, step)
    monitor.close()


def test_follow_with_model_config_and_text_is_the_inline_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer

    from checkpoint_stability.offline.analysis import text_task

    tokenizer = tiny_tokenizer()
    config_dir = tmp_path / "config"
    tiny_gpt2(0).config.save_pretrained(config_dir)
    tokenizer.save_pretrained(config_dir)  # --text and the export take the tokenizer from here
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(CORPUS[:6]) + "\n", encoding="utf-8")
    settings = {"window": 2, "every_n_steps": 1, "console": False}
    # The inline oracle evaluates the task the command builds from --text: the file's first 64 predicted
    # tokens, in sequences of 128 (the default, shorter than the model's 256), the same tokenizer.
    task = text_task(text, [("config", tokenizer)], max_tokens=64, vocab_size=len(tokenizer))
    gpt2_training(StabilityMonitor([task], dirpath=tmp_path / "inline", **settings))
    run_dir = tmp_path / "bg"
    gpt2_training(StabilityMonitor([], dirpath=run_dir, evaluation="background", **settings))

    argv = ["follow", run_dir, "--text", text, "--text-max-tokens", "64", "--model-config", config_dir]
    code, out, err = run([*argv, "--timeout", "0", "--poll", "0.01", "--quiet"], capsys)

    assert code == 0, err
    match = summary(out)
    assert (match["n"], match["first"], match["last"], match["closed"]) == ("3", "1", "3", "closed")
    for name in ("history.jsonl", "examples/heldout.jsonl"):
        assert lines(run_dir / name) == lines(tmp_path / "inline" / name), name
    assert {r["step"] for r in lines(run_dir / "history.jsonl")} == {1, 2, 3}
    best = json.loads((run_dir / "best.json").read_text())
    assert best == json.loads((tmp_path / "inline" / "best.json").read_text())
    # A Hugging Face export (save_pretrained), loadable as one; with --model-config's tokenizer beside it.
    from transformers import AutoModelForCausalLM

    exported = run_dir / best["path"]
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    with safe_open(tmp_path / "inline" / best["path"] / "model.safetensors", "pt") as theirs:
        for name in theirs.keys():
            assert torch.equal(loaded.state_dict()[name], theirs.get_tensor(name)), name


def test_follow_text_without_a_tokenizer_is_refused(tmp_path, follow_module, capsys):
    run_dir = tmp_path / "bg"
    background_run(run_dir, max_pending=20)
    text = tmp_path / "heldout.txt"
    text.write_text("some held-out text\n", encoding="utf-8")
    code, _, err = run(["follow", run_dir, "--text", text, "--model", "follow_tasks:model"], capsys)
    assert code == 2 and "--text needs a tokenizer: pass --tokenizer DIR" in err
