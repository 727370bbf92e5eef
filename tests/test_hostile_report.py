"""Hostile run and output directories against the report and the analyze command.

Every test plants something a probe (or a careless colleague) could leave in a run directory — a
symlink where a file is written, a history line naming ``../../evil``, an examples line whose
``correct`` holds strings, a JSON file nested 100,000 levels deep — and checks a real outcome: the
report still holds the valid tasks' numbers (computed here from the pristine files with ``json``), the
warning names the run's own file, a file outside the directory is byte-identical afterwards, the
command exits 2 with one line naming the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_stability import history as history_module
from checkpoint_stability.history import History
from checkpoint_stability.offline.analysis import checkpoint_step, order_series
from checkpoint_stability.offline.cli import main
from checkpoint_stability.reporting.report import write_report
from checkpoint_stability.reporting.summary import summarize
from checkpoint_stability.storage.checkpoint_files import resolve_checkpoint

pytest.importorskip("matplotlib")

TARGETS = ["a", "b", "c"]
STEPS = [10, 20, 30, 40, 50, 60]


def raw_outputs(k: int) -> list[str]:
    return ["a", "b" if k % 2 else "x", "c" if k % 3 else "y"]


def avg_outputs(k: int) -> list[str]:
    return ["a", "b", "c" if k % 4 else "y"]


def make_run(root: Path) -> Path:
    """A run of task ``t`` (three examples): raw and avg window 2 at six steps, written by History."""
    history = History(root)
    history.write_meta("t", kind="function", metric="exact_match", example_ids=[0, 1, 2], targets=TARGETS)
    for k, step in enumerate(STEPS, start=1):
        for variant, window, outputs in (("raw", 1, raw_outputs(k)), ("avg", 2, avg_outputs(k))):
            correct = [float(o == t) for o, t in zip(outputs, TARGETS, strict=True)]
            history.append_outputs("t", step, variant, window, outputs, correct)
            history.append(
                {
                    "step": step,
                    "task": "t",
                    "variant": variant,
                    "window": window,
                    "n_models": min(window, k),
                    "score": sum(correct) / len(correct),
                    "mtv": None,
                    "is": None,
                }
            )
    return root


# ------------------------------------------------------------------------------------- independent oracle


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def oracle_table(run: Path) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(variant, window) -> (score, MTV, IS) over the final 20% as the report prints them, computed with
    ``json`` from a pristine run directory."""
    records = [r for r in read_jsonl(run / "history.jsonl") if "error" not in r]
    lines = read_jsonl(run / "examples" / "t.jsonl")
    table = {}
    for variant, window in (("raw", 1), ("avg", 2)):
        series = sorted(
            (r for r in records if (r["variant"], r["window"]) == (variant, window)), key=lambda r: r["step"]
        )
        last = series[-min(len(series), max(2, math.ceil(0.2 * len(series)))) :]
        scores = [r["score"] for r in last]
        mtv = sum(abs(b - a) for a, b in itertools.pairwise(scores)) / (len(scores) - 1)
        by_step = {
            line["step"]: line["outputs"]
            for line in lines
            if (line["variant"], line["window"]) == (variant, window)
        }
        rows = [by_step[r["step"]] for r in last]
        instability = (
            sum(
                sum(rows[t][i] != rows[t + 1][i] for t in range(len(rows) - 1)) / (len(rows) - 1)
                for i in range(3)
            )
            / 3
        )
        table[(variant, str(window))] = (
            f"{sum(scores) / len(scores):.4f}",
            f"{mtv:.4f}",
            f"{instability:.4f}",
        )
    return table


def report_table(text: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """The stability table's rows of task ``t``: (variant, window) -> (score, MTV, IS), final 20%."""
    lines = text.split("## Stability", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block[2:]]
    return {(row[1], row[2]): (row[4], row[5], row[6]) for row in rows if row[0] == "t"}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with a digest of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = "link -> " + os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def no_plots(monkeypatch):
    """Text-only tests skip the drawing: each plot function writes a placeholder at the path it is given
    (so a path that leaves the report directory would still be written, and caught)."""

    def placeholder(path, **kwargs):
        Path(path).write_bytes(b"placeholder")

    for name in ("plot_scores", "plot_flips", "plot_window_sweep"):
        monkeypatch.setattr(f"checkpoint_stability.reporting.plots.{name}", placeholder)


@pytest.fixture
def lenient_history(monkeypatch):
    """A History whose examples-line check only looks at the types of the keys (as it did before it
    checked ``correct``): the report must hold up on its own, whatever its reader lets through."""

    def lenient(obj: dict) -> dict:
        ok = (
            type(obj.get("step")) is int
            and isinstance(obj.get("variant"), str)
            and type(obj.get("window")) is int
            and isinstance(obj.get("outputs"), list)
            and isinstance(obj.get("correct"), list)
        )
        if not ok:
            raise history_module._Bad
        return obj

    monkeypatch.setattr(history_module, "_check_outputs_line", lenient)


def append_line(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


# ------------------------------------------------------------------------------------- task names


def test_history_line_with_an_invalid_task_name_is_skipped_and_the_report_written(tmp_path, caplog):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    for task in ("../../evil", "a/b", ".hidden"):
        append_line(
            run / "history.jsonl",
            {
                "step": 70,
                "task": task,
                "variant": "raw",
                "window": 1,
                "n_models": 1,
                "score": 0.5,
                "mtv": None,
                "is": None,
                "time": 1.0,
            },
        )
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        path = write_report(run)  # real plots: their files are named after the tasks
    text = path.read_text()
    assert report_table(text) == expected
    assert "evil" not in text
    warned = [m for m in warnings_from(caplog) if "task name" in m]
    assert len(warned) == 1 and str(run / "history.jsonl") in warned[0] and "3 score line(s)" in warned[0]
    after = tree(tmp_path)
    new = sorted(set(after) - set(before))
    assert new and all(name.startswith("run/report/") for name in new), new
    assert {name: after[name] for name in before} == before


def test_summarize_skips_records_whose_task_name_is_not_a_valid_name(tmp_path):
    run = make_run(tmp_path / "run")
    expected = {(r["variant"], r["window"]): r["score_last"] for r in summarize(run)}
    append_line(
        run / "history.jsonl",
        {
            "step": 70,
            "task": "../../evil",
            "variant": "raw",
            "window": 1,
            "n_models": 1,
            "score": 0.5,
            "mtv": None,
            "is": None,
            "time": 1.0,
        },
    )
    append_line(
        run / "history.jsonl",
        {
            "step": 80,
            "task": "../../evil",
            "variant": "raw",
            "window": 1,
            "n_models": 1,
            "score": 0.5,
            "mtv": None,
            "is": None,
            "time": 1.0,
        },
    )
    rows = summarize(run)
    assert {r["task"] for r in rows} == {"t"}
    assert {(r["variant"], r["window"]): r["score_last"] for r in rows} == expected


def test_invalid_task_names_in_examples_files_leave_the_valid_task_alone(tmp_path, caplog, no_plots):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    examples = run / "examples"
    # A meta file whose inner name is a path, a hidden outputs file, a name with a control character.
    (examples / "u.meta.json").write_text(
        json.dumps(
            {"task": "../../evil", "kind": "k", "metric": "exact_match", "example_ids": [0], "targets": [1]}
        )
    )
    (examples / "..evil.jsonl").write_text(
        json.dumps({"step": 1, "variant": "raw", "window": 1, "outputs": [1], "correct": [1.0]}) + "\n"
    )
    (examples / "a\x07b.jsonl").write_text("{}\n")
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    warned = warnings_from(caplog)
    assert any(str(examples / "u.meta.json") in m for m in warned), warned
    assert not any("checkpoint-stability-report-" in m for m in warned), warned
    after = tree(tmp_path)
    assert all(name.startswith("run/report/") for name in set(after) - set(before))
    assert {name: after[name] for name in before} == before


# ------------------------------------------------------------------------------------- warnings' paths


def test_warnings_name_the_run_directory_files_not_a_temporary_copy(tmp_path, caplog, no_plots):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    with open(run / "history.jsonl", "a") as f:
        f.write("this is not json\n")
    with open(run / "examples" / "t.jsonl", "a") as f:
        f.write("{broken\n")
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    warned = warnings_from(caplog)
    assert any(m.startswith(f"{run / 'history.jsonl'}:") for m in warned), warned
    assert any(m.startswith(f"{run / 'examples' / 't.jsonl'}:") for m in warned), warned
    assert not any(
        "checkpoint-stability-report-" in m or "/tmp/" in m.replace(str(tmp_path), "") for m in warned
    )


# ------------------------------------------------------------------------------------- damaged examples lines

DAMAGED_LINES = {
    "string correct": {"outputs": ["a", "b", "c"], "correct": ["1", "yes", "1"]},
    "correct 7.0": {"outputs": ["a", "b", "c"], "correct": 7.0},
    "a correct of 7.0": {"outputs": ["a", "b", "c"], "correct": [1.0, 7.0, 1.0]},
    "correct shorter than outputs": {"outputs": ["a", "b", "c"], "correct": [1.0, 1.0]},
    "more outputs than example_ids": {"outputs": ["a", "b", "c", "d"], "correct": [1.0, 1.0, 1.0, 0.0]},
    "unhashable outputs": {"outputs": [{"x": 1}, "b", "c"], "correct": [0.0, 1.0, 1.0]},
    "logprobs of another shape": {
        "outputs": [0, 1, 2],
        "correct": [0.0, 0.0, 0.0],
        "choice_logprobs": [[-1.0]],
    },
}


@pytest.mark.parametrize("reader", ["history as is", "lenient history"])
@pytest.mark.parametrize("damage", sorted(DAMAGED_LINES))
def test_a_damaged_examples_line_is_skipped_with_a_warning(
    tmp_path, caplog, no_plots, request, damage, reader
):
    if reader == "lenient history":
        request.getfixturevalue("lenient_history")
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    # The newest raw line written again for the last step, damaged: read as is, it would replace the
    # valid one in the table's IS, the flips and the window sweep.
    append_line(
        run / "examples" / "t.jsonl",
        {"step": STEPS[-1], "variant": "raw", "window": 1, **DAMAGED_LINES[damage]},
    )
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    assert "## Ensemble window size" in text and "| t | 2 |" in text
    about_examples = [m for m in warnings_from(caplog) if str(run / "examples" / "t.jsonl") in m]
    assert len(about_examples) == 1, warnings_from(caplog)


def test_a_history_record_beyond_any_real_step_is_skipped(tmp_path, caplog, no_plots):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    append_line(
        run / "history.jsonl",
        {
            "step": 10**400,
            "task": "t",
            "variant": "ens",
            "window": 2,
            "n_models": 2,
            "score": 0.5,
            "mtv": None,
            "is": None,
            "time": 1.0,
        },
    )
    append_line(
        run / "history.jsonl",
        {
            "step": 70,
            "task": "t",
            "variant": "ens",
            "window": 2,
            "n_models": 2,
            "score": 1e308,
            "mtv": None,
            "is": None,
            "time": 1.0,
        },
    )
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    warned = [m for m in warnings_from(caplog) if str(run / "history.jsonl") in m]
    # The step beyond int64 is damage to the history reader itself; the score beyond [0, 1] to the report.
    assert len(warned) == 2, warnings_from(caplog)
    assert "skipped 1 damaged line(s)" in warned[0] and "1 score line(s)" in warned[1]


def test_a_meta_whose_ids_and_targets_disagree_is_ignored_with_a_warning(tmp_path, caplog, no_plots):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    meta = json.loads((run / "examples" / "t.meta.json").read_text())
    meta["targets"] = meta["targets"][:2]
    (run / "examples" / "t.meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    assert "Task t: no usable meta file" in text
    assert any(str(run / "examples" / "t.meta.json") in m for m in warnings_from(caplog))


# ------------------------------------------------------------------------------------- nested JSON


def test_a_deeply_nested_best_json_does_not_stop_the_report(tmp_path, no_plots):
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    (run / "best.json").write_text("[" * 100_000)
    assert report_table(write_report(run).read_text()) == expected


def test_a_deeply_nested_trainer_state_leaves_the_step_unknown_with_a_warning(tmp_path, caplog):
    paths = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        paths.append(folder / "model.safetensors")
    (tmp_path / "first" / "trainer_state.json").write_text('{"global_step": ' + "[" * 100_000)
    (tmp_path / "second" / "trainer_state.json").write_text('{"global_step": 7}')
    with caplog.at_level(logging.WARNING):
        assert checkpoint_step(resolve_checkpoint(paths[0])) is None
    warned = warnings_from(caplog)
    assert any(
        str(tmp_path / "first" / "trainer_state.json") in m and "nested too deeply" in m for m in warned
    )
    assert checkpoint_step(resolve_checkpoint(paths[1])) == 7
    series = order_series(paths)
    assert (series.steps, series.step_source) == ([1, 2], "positions")


# ------------------------------------------------------------------------------------- the report directory


@pytest.mark.parametrize("kind", ["symlink to a report elsewhere", "symlink to nowhere", "regular file"])
def test_a_report_path_that_is_not_a_directory_of_its_own_is_refused(tmp_path, capsys, kind):
    run = make_run(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.md").write_text("someone else's report\n")
    (outside / "scores-t.png").write_bytes(b"not ours")
    if kind == "symlink to a report elsewhere":
        (run / "report").symlink_to(outside)
    elif kind == "symlink to nowhere":
        (run / "report").symlink_to(tmp_path / "missing")
    else:
        (run / "report").write_text("a file\n")
    before = tree(tmp_path)
    code = main(["report", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("checkpoint-stability report: error:")
    assert str(run / "report") in err[0]
    assert ("is a symlink" if kind.startswith("symlink") else "not a directory") in err[0]
    assert tree(tmp_path) == before  # the link, the file and the report elsewhere are all untouched
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------- analyze

TASKS_FILE = """
from checkpoint_stability import FunctionTask


def build():
    return [FunctionTask("t", lambda model: [0, 1, 0], targets=[0, 1, 1])]
"""


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two tiny Hugging Face checkpoints and a tasks file whose task does not need the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("series")
    config = GPT2Config(vocab_size=8, n_positions=8, n_embd=4, n_layer=1, n_head=1)
    paths = []
    for step in (100, 200):
        torch.manual_seed(step)
        GPT2LMHeadModel(config).save_pretrained(root / f"checkpoint-{step}")
        paths.append(root / f"checkpoint-{step}")
    tasks = root / "hostile_tasks.py"
    tasks.write_text(TASKS_FILE)
    return paths, tasks


def analyze_cli(series, run: Path, capsys, *extra) -> tuple[int, list[str]]:
    checkpoints, tasks = series
    argv = [
        "analyze",
        *map(str, checkpoints),
        "-o",
        str(run),
        "--windows",
        "1,2",
        "--tasks",
        f"{tasks}:build",
    ]
    code = main([*argv, "--no-progress", *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]
    return code, errors


PLANTED = {
    "history.jsonl": "file",
    "analysis.json": "file",
    "lock.json": "file",
    "examples/t.jsonl": "file",
    "examples/t.meta.json": "file",
    "examples": "directory",
    "report": "directory",
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_analyze_refuses_a_symlink_at_every_path_it_writes(series, tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"precious, not the run's\n")
    (outside / "report.md").write_text("a report of another run\n")
    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    link = run / name
    if name == "examples":
        (run / "examples").rmdir()
    link.symlink_to(outside / "sentinel" if PLANTED[name] == "file" else outside)
    before = tree(outside)
    code, errors = analyze_cli(series, run, capsys)
    assert code == 2
    assert len(errors) == 1 and str(link) in errors[0] and f"{link} is a symlink" in errors[0], errors
    assert tree(outside) == before
    assert link.is_symlink()
    assert not (run / "history.jsonl").is_file() or name == "history.jsonl"  # refused before evaluating


def test_analyze_writes_nothing_outside_its_directory_when_all_is_well(series, tmp_path, capsys):
    # The control for the test above: the same command on a clean directory succeeds.
    run = tmp_path / "run"
    code, errors = analyze_cli(series, run, capsys, "--no-report")
    assert code == 0 and not errors
    assert {r["task"] for r in read_jsonl(run / "history.jsonl")} == {"t", "mean"}


CRAFTED_ANALYSIS = {
    "list at the top": ("[]", "JSON object"),
    "deep nesting": ("[" * 100_000, "nested too deeply"),
    "missing keys": ("{}", "'tasks'"),
    "tasks not a list": ('{"tasks": 5}', "'tasks'"),
    "checkpoints of numbers": (None, "'checkpoints'"),
    "checkpoint without a name": (None, "'checkpoints'"),
    "windows of strings": (None, "'windows'"),
    "horizon a string": (None, "'horizon'"),
}


@pytest.mark.parametrize("case", list(CRAFTED_ANALYSIS))
def test_a_crafted_analysis_json_is_a_clear_error(series, tmp_path, capsys, case):
    run = tmp_path / "run"
    assert analyze_cli(series, run, capsys, "--no-report")[0] == 0
    good = json.loads((run / "analysis.json").read_text())
    text, words = CRAFTED_ANALYSIS[case]
    if text is None:
        crafted = dict(good)
        if case == "checkpoints of numbers":
            crafted["checkpoints"] = [1, 2]
        elif case == "checkpoint without a name":
            crafted["checkpoints"] = [{"step": 100}, {"step": 200}]
        elif case == "windows of strings":
            crafted["windows"] = ["1", "2"]
        else:
            crafted["horizon"] = "20"
        text = json.dumps(crafted)
    (run / "analysis.json").write_text(text)
    history_before = (run / "history.jsonl").read_bytes()
    code, errors = analyze_cli(series, run, capsys, "--no-report")
    assert code == 2
    assert len(errors) == 1 and str(run / "analysis.json") in errors[0] and words in errors[0], errors
    assert len(errors[0]) < 500
    assert (run / "history.jsonl").read_bytes() == history_before


# ------------------------------------------------------------------------- lines that do not fit together


def test_two_tasks_without_mean_records_and_log_probabilities_that_disagree(tmp_path, caplog, no_plots):
    # Each examples line of task m is fine on its own, but the number of choices of its one example
    # changes between steps (2, then 3): the vote of a window cannot be taken. And no "mean" record was
    # kept although there are two tasks (a history pieced together by hand, or cut).
    run = make_run(tmp_path / "run")
    expected = oracle_table(run)
    history = History(run)
    history.write_meta("m", kind="multiple_choice", metric="accuracy", example_ids=[0], targets=[0])
    for step, logprobs in ((10, [[-0.1, -2.0]]), (20, [[-2.0, -0.1, -3.0]]), (30, [[-0.1, -2.0]])):
        output = 0 if logprobs[0][0] > -1 else 1
        history.append_outputs("m", step, "raw", 1, [output], [float(output == 0)], choice_logprobs=logprobs)
        history.append(
            {
                "step": step,
                "task": "m",
                "variant": "raw",
                "window": 1,
                "n_models": 1,
                "score": float(output == 0),
                "mtv": None,
                "is": None,
            }
        )
    with caplog.at_level(logging.WARNING):
        text = write_report(run).read_text()
    assert report_table(text) == expected
    assert "| m | raw | 1 | 2 / 3 | 0.5000 | 1.0000 | 1.0000 |" in text
    assert "Task m: the stored outputs cannot be voted on" in text and "| t | 2 |" in text
    assert any(
        str(run / "examples" / "m.jsonl") in m and "number of choices" in m for m in warnings_from(caplog)
    )
