"""The report of a run directory: files, the table's numbers and the window sweep against oracles.

The main run is a real StabilityMonitor driven with scripted outputs: the model's single weight is set
to the snapshot index ``k``, and a task's ``predict`` answers from a hand-written script, telling the
live model (weight == k) from the window average (weight == the mean of the window) apart. So the raw
series' MTV and IS, and the votes of the window sweep, are known by hand; everything else in the table
is checked against float64 recomputations from ``history.jsonl`` read with ``json``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.history import History
from checkpoint_stability.reporting import report as report_module
from checkpoint_stability.reporting.report import score_outputs, window_sweep, write_report

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

SNAPSHOTS = 15  # final 20%: ceil(0.2 * 15) = 3 evaluations, k = 13, 14, 15
MC_TARGETS = [0, 1, 2, 0]
QA_TARGETS = ["abc", "xy"]


def mc_raw(k: int) -> list[int]:
    """Example 0 always right; 1 right at odd k; 2 always wrong; 3 right unless k is a multiple of 3."""
    return [0, 1 if k % 2 else 0, 1, 2 if k % 3 == 0 else 0]


def mc_avg(k: int) -> list[int]:
    return [0, 1, 2, 0] if k % 4 < 2 else [0, 1, 1, 0]


def qa_raw(k: int) -> list[str]:
    return ["abc" if k % 2 else "abd", "xy"]


def scripted_task(name: str, raw, avg, targets, metric: str, live: dict) -> FunctionTask:
    def predict(model):
        k = live["k"]
        # At k = 1 the window holds one snapshot, so the average *is* the live model: same answers.
        is_live = model.weight.item() == float(k)
        return raw(k) if is_live else avg(k)

    return FunctionTask(name, predict, targets=targets, metric=metric)


def run_monitor(dirpath: Path, snapshots: int = SNAPSHOTS, **settings) -> None:
    live = {"k": 0}
    tasks = [
        scripted_task("mc", mc_raw, mc_avg, MC_TARGETS, "exact_match", live),
        scripted_task("qa", qa_raw, lambda k: list(QA_TARGETS), QA_TARGETS, "char_f1", live),
    ]
    # report=False: these tests draw the report themselves, where and when they choose.
    settings = {
        "window": 3,
        "every_n_steps": 10,
        "console": False,
        "tensorboard": False,
        "report": False,
        **settings,
    }
    monitor = StabilityMonitor(tasks, dirpath=dirpath, **settings)
    model = torch.nn.Linear(1, 1, bias=False)
    for k in range(1, snapshots + 1):
        live["k"] = k
        with torch.no_grad():
            model.weight.fill_(float(k))
        monitor.on_snapshot(model, 10 * k)
    monitor.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    dirpath = tmp_path_factory.mktemp("run")
    run_monitor(dirpath)
    return dirpath


@pytest.fixture(scope="module")
def report(run) -> Path:
    backend = matplotlib.get_backend()
    path = write_report(run)
    assert matplotlib.get_backend() == backend  # the user's backend is left alone
    return path


# ------------------------------------------------------------------------------------- independent oracle


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_size(total: int, fraction: float) -> int:
    return min(total, max(2, math.ceil(fraction * total)))


def mtv(scores: list[float]) -> float:
    return sum(abs(b - a) for a, b in itertools.pairwise(scores)) / (len(scores) - 1)


def instability(rows: list[list]) -> float:
    examples = len(rows[0])
    per_example = [
        sum(rows[t][i] != rows[t + 1][i] for t in range(len(rows) - 1)) / (len(rows) - 1)
        for i in range(examples)
    ]
    return sum(per_example) / examples


def expected_table(run: Path, fraction: float) -> dict[tuple, dict]:
    """(task, variant, window) -> score over the final fraction, MTV and IS, from the files alone."""
    records = [r for r in read_jsonl(run / "history.jsonl") if "error" not in r]
    series: dict[tuple, list[dict]] = {}
    for r in records:
        series.setdefault((r["task"], r["variant"], r["window"]), []).append(r)
    table = {}
    for key, rows in series.items():
        rows.sort(key=lambda r: r["step"])
        last = rows[-final_size(len(rows), fraction) :]
        entry = {
            "score": sum(r["score"] for r in last) / len(last),
            "mtv": mtv([r["score"] for r in last]),
            "count": (len(last), len(rows)),
        }
        task, variant, window = key
        if task != "mean":
            lines = [
                line
                for line in read_jsonl(run / "examples" / f"{task}.jsonl")
                if (line["variant"], line["window"]) == (variant, window)
            ]
            by_step = {line["step"]: line["outputs"] for line in lines}
            entry["is"] = instability([by_step[r["step"]] for r in last])
        table[key] = entry
    for key, entry in table.items():
        if key[0] == "mean":
            task_is = [e["is"] for k, e in table.items() if k[0] != "mean" and k[1:] == key[1:]]
            entry["is"] = sum(task_is) / len(task_is)
    return table


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block[2:]]


@pytest.fixture
def no_plots(monkeypatch):
    """Tests about the report's text and files skip the drawing (the slow part): each plot function
    writes a placeholder file instead. The figures themselves are checked on the main run."""

    def placeholder(path, **kwargs):
        Path(path).write_bytes(b"placeholder")

    for name in ("plot_scores", "plot_flips", "plot_window_sweep", "plot_drift"):
        monkeypatch.setattr(f"checkpoint_stability.reporting.plots.{name}", placeholder)


# ---------------------------------------------------------------------------------------------------- tests


def test_report_files_exist_and_are_valid_pngs(report):
    assert report.name == "report.md" and report.parent.name == "report"
    text = report.read_text()
    assert text.startswith("# Checkpoint stability report")
    names = {"scores-mc.png", "scores-qa.png", "scores-mean.png", "flips-mc.png", "flips-qa.png"}
    names.add("window-sweep.png")
    names.add("weight-drift.png")  # the monitor records drift.jsonl by default
    assert {p.name for p in report.parent.iterdir()} == names | {"report.md"}
    for name in names:
        assert f"]({name})" in text
        path = report.parent / name
        assert path.stat().st_size > 10_000
        pixels = mpimg.imread(path)  # matplotlib's own PNG reader
        height, width, channels = pixels.shape
        assert width >= 800 and height >= 400 and channels in (3, 4), (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, name  # not a blank canvas
    # The directory gets the same permissions as any directory made here (a private temporary
    # directory swapped into place would be unreadable to everyone else).
    fresh = report.parent.parent / "fresh"
    fresh.mkdir()
    assert report.parent.stat().st_mode & 0o777 == fresh.stat().st_mode & 0o777
    fresh.rmdir()
    # Nothing left behind by the staging and swap.
    assert sorted(p.name for p in report.parent.parent.iterdir() if p.name.startswith(".report")) == []


def test_table_numbers_equal_the_history(run, report):
    text = report.read_text()
    rows = markdown_table(text, "## Stability")
    final, whole = expected_table(run, 0.2), expected_table(run, 1.0)
    # Every series with two evaluations has its row, the mean over the two tasks included.
    assert {(r[0], r[1], int(r[2])) for r in rows} == set(final)
    assert len(rows) == 2 * 3 + 3
    for (
        task,
        variant,
        window,
        evaluations,
        score,
        mtv_final,
        is_final,
        _,
        _,
        score_all,
        mtv_all,
        is_all,
    ) in rows:
        key = (task, variant, int(window))
        assert evaluations == "{} / {}".format(*final[key]["count"])
        for cell, value in (
            (score, final[key]["score"]),
            (mtv_final, final[key]["mtv"]),
            (is_final, final[key]["is"]),
            (score_all, whole[key]["score"]),
            (mtv_all, whole[key]["mtv"]),
            (is_all, whole[key]["is"]),
        ):
            assert float(cell) == pytest.approx(value, abs=5.1e-5), (key, cell, value)


def test_raw_row_matches_the_hand_computed_values(report):
    rows = {(r[0], r[1]): r for r in markdown_table(report.read_text(), "## Stability")}
    # mc, k = 13, 14, 15: correct [1,1,0,1], [1,0,0,1], [1,1,0,0] -> scores 0.75, 0.5, 0.5
    # MTV = (0.25 + 0) / 2; IS: example 1 flips twice, example 3 once (0, 0, 2): (0 + 1 + 0 + 0.5) / 4.
    mc = rows[("mc", "raw")]
    assert mc[3] == "3 / 15" and mc[4:7] == ["0.5833", "0.1250", "0.3750"]
    # qa: "abc" / "abd" alternate, char F1 of "abd" is 2/3 -> scores 1, 5/6, 1; IS = (1 + 0) / 2.
    qa = rows[("qa", "raw")]
    assert qa[4:7] == [f"{(1 + 5 / 6 + 1) / 3:.4f}", f"{1 / 6:.4f}", "0.5000"]
    # Whole run of mc: score changes at each k are known from the script.
    scores = [
        sum(float(o == t) for o, t in zip(mc_raw(k), MC_TARGETS, strict=True)) / 4 for k in range(1, 16)
    ]
    assert float(mc[10]) == pytest.approx(mtv(scores), abs=5.1e-5)


def test_window_sweep_n1_is_raw_and_n5_is_the_hand_counted_vote(report):
    text = report.read_text()
    sweep = {(r[0], int(r[1])): r for r in markdown_table(text, "## Ensemble window size")}
    # 15 raw evaluations: n = 20 is left out.
    assert sorted(n for task, n in sweep if task == "mc") == [1, 2, 5, 10]
    table = {(r[0], r[1]): r for r in markdown_table(text, "## Stability")}
    for task in ("mc", "qa"):
        assert sweep[(task, 1)][2:5] == table[(task, "raw")][4:7]
    # mc, n = 5, by hand: at k = 13 the window is k = 9..13.
    #   example 1 votes 1,0,1,0,1 -> 1 (right); example 3 votes 2,0,0,2,0 -> 0 (right): score 3/4
    # k = 14 (10..14): example 1 votes 0,1,0,1,0 -> 0 (wrong); example 3 votes 0,0,2,0,0 -> 0: 2/4
    # k = 15 (11..15): example 1 -> 1 (right); example 3 votes 0,2,0,0,2 -> 0 (right): 3/4
    # Examples 0 and 2 never change (0: right, 2: wrong). MTV = 0.25; IS: example 1 flips twice -> 1/4.
    assert sweep[("mc", 5)][2:6] == [f"{2 / 3:.4f}", "0.2500", "0.2500", "3 / 15"]
    # mc, n = 2: two votes tie whenever the answer changed; without log-probs the newest wins: raw again.
    assert sweep[("mc", 2)][2:5] == table[("mc", "raw")][4:7]
    # The live ens series (window 3) is the same vote over 3 snapshots: the sweep must agree with it
    # wherever the window sizes agree, which the monitor's own records check from the other side.
    history = History(report.parent.parent)
    live_ens = {r["step"]: r["score"] for r in history.records(task="mc", variant="ens")}
    three = window_sweep(history, "mc", windows=(3,))[0]
    assert three["score"] == pytest.approx(sum(live_ens[10 * k] for k in (13, 14, 15)) / 3)


def test_window_sweep_breaks_ties_with_stored_log_probabilities(tmp_path):
    history = History(tmp_path)
    history.write_meta("mc", kind="multiple_choice", metric="accuracy", example_ids=["a"], targets=[0])
    # Two snapshots disagree; the older one is far more confident, so the summed log-probs pick 0,
    # where a tie without log-probs would go to the newest answer, 1.
    history.append_outputs("mc", 1, "raw", 1, [0], [1.0], choice_logprobs=[[-0.01, -6.0]])
    history.append_outputs("mc", 2, "raw", 1, [1], [0.0], choice_logprobs=[[-1.0, -0.5]])
    history.append_outputs("mc", 3, "raw", 1, [1], [0.0], choice_logprobs=[[-3.0, -0.1]])
    rows = {row["n"]: row for row in window_sweep(history, "mc", windows=(1, 2, 5))}
    assert rows[1]["score"] == 0.0 and rows[1]["is"] == 0.0  # final 2 of 3: steps 2, 3 answer 1
    # n = 2 at step 2: {0: -0.01 - 1.0, 1: -6.0 - 0.5} -> 0 (right); at step 3: 1,1 -> 1 (wrong).
    assert (rows[2]["score"], rows[2]["mtv"], rows[2]["is"]) == (0.5, 1.0, 1.0)
    # n = 5 is more than the three evaluations there are: left out.
    assert sorted(rows) == [1, 2]


def test_score_outputs_follows_the_tasks_metrics():
    assert score_outputs([2, 1], [2, 0], "accuracy") == [1.0, 0.0]
    assert score_outputs([1, "b"], [[0, 1], ["a", "c"]], "acc_norm") == [1.0, 0.0]  # several answers
    assert score_outputs(["abd"], ["abc"], "char_f1") == [pytest.approx(2 / 3)]
    assert score_outputs([[1, 2]], [[1, 2]], "exact_match") == [1.0]  # a list output is one answer


def test_several_windows_per_step_and_sparse_average(tmp_path):
    # What an offline analysis writes: raw once per step, avg and ens for windows 2 and 4; avg only at
    # every other step (average_every = 2).
    history = History(tmp_path)
    history.write_meta("t", kind="function", metric="exact_match", example_ids=[0, 1], targets=[1, 1])
    records = []
    for k in range(1, 11):
        step = 100 * k
        raw = [k % 2, 1]
        history.append_outputs("t", step, "raw", 1, raw, [float(o == 1) for o in raw])
        records.append({"step": step, "task": "t", "variant": "raw", "window": 1, "n_models": 1,
                        "score": sum(o == 1 for o in raw) / 2, "mtv": None, "is": None})  # fmt: skip
        for variant, window in (("avg", 2), ("avg", 4), ("ens", 2), ("ens", 4)):
            if variant == "avg" and k % 2 == 0:
                continue
            outputs = [1, 1] if (k + window) % 3 else [0, 1]
            history.append_outputs("t", step, variant, window, outputs, [float(o == 1) for o in outputs])
            records.append({"step": step, "task": "t", "variant": variant, "window": window,
                            "n_models": min(k, window), "score": sum(o == 1 for o in outputs) / 2,
                            "mtv": None, "is": None})  # fmt: skip
    history.append_many(records)
    text = write_report(tmp_path).read_text()
    rows = markdown_table(text, "## Stability")
    final, whole = expected_table(tmp_path, 0.2), expected_table(tmp_path, 1.0)
    assert [(r[1], int(r[2])) for r in rows] == [("raw", 1), ("avg", 2), ("avg", 4), ("ens", 2), ("ens", 4)]
    for row in rows:
        key = ("t", row[1], int(row[2]))
        assert [float(row[4]), float(row[5]), float(row[6])] == pytest.approx(
            [final[key]["score"], final[key]["mtv"], final[key]["is"]], abs=5.1e-5
        )
        assert float(row[11]) == pytest.approx(whole[key]["is"], abs=5.1e-5)
    assert "evaluated at 5 of the 10 snapshot steps (`average_every` > 1)" in text
    assert "fewer snapshots than their window" in text
    for name in ("scores-t.png", "flips-t.png", "window-sweep.png"):
        assert mpimg.imread(tmp_path / "report" / name).shape[0] >= 400


def test_average_every_from_a_real_monitor_is_noted(tmp_path, no_plots):
    run_monitor(tmp_path, snapshots=6, average_every=2)
    text = write_report(tmp_path, output_dir=tmp_path / "elsewhere").read_text()
    assert "avg (window 3) was evaluated at 3 of the 6 snapshot steps" in text
    assert not (tmp_path / "report").exists()


def test_a_directory_without_history_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "stability").mkdir()
    (tmp_path / "stability" / "history.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no history\.jsonl.*did you mean .*stability"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_run_without_records_gets_a_short_report(tmp_path, no_plots):
    History(tmp_path).append_error(5, "evaluate", "RuntimeError: boom", task="t", variant="raw")
    path = write_report(tmp_path)
    text = path.read_text()
    assert "No evaluation records yet" in text
    assert "| 5 | evaluate | t | raw | RuntimeError: boom |" in text
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_the_run_directory_is_only_read(run, tmp_path, no_plots):
    # A torn last line, as a training run writing right now would show: opening a History on the run
    # would cut it off; the report must leave the file exactly as it is.
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("history.jsonl", "examples/mc.jsonl", "examples/mc.meta.json"):
        (copy / name).parent.mkdir(exist_ok=True)
        (copy / name).write_bytes((run / name).read_bytes())
    with open(copy / "history.jsonl", "ab") as f:
        f.write(b'{"step": 999, "task": "mc", "vari')

    def digest() -> dict:
        return {
            str(p.relative_to(copy)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in copy.rglob("*")
            if p.is_file() and "report" not in p.parts
        }

    before = digest()
    write_report(copy)
    assert digest() == before


def test_an_existing_report_is_replaced_whole_or_not_at_all(run, tmp_path, no_plots, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores-renamed-task.png").write_bytes(b"stale")
    (out / "report.md").write_text("old")
    write_report(run, output_dir=out)
    assert not (out / "scores-renamed-task.png").exists()
    assert (out / "report.md").read_text().startswith("# Checkpoint stability report")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copy left behind

    # A failure half-way (here: the disk fills up at the last plot) leaves the previous report intact.
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("checkpoint_stability.reporting.plots.plot_window_sweep", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_report(run, output_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_directory_holding_other_files_is_refused_not_replaced(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine holds files a report does not write \(notes\.txt\)"):
        write_report(run, output_dir=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_without_matplotlib_the_error_says_what_to_install(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install checkpoint-stability\[report\]"):
        write_report(run, output_dir=tmp_path / "out")
    assert report_module.INSTALL_HINT == "pip install checkpoint-stability[report]"
