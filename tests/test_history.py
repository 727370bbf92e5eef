"""History: on-disk format checked with plain json.loads, crash repair, truncation on resume."""

from __future__ import annotations

import json
import logging
import math

import pytest

from checkpoint_stability.history import History, atomic_write_bytes, atomic_write_text


def score(step: int, task: str = "hellaswag", variant: str = "raw", window: int = 1, **kw) -> dict:
    rec = {
        "step": step,
        "task": task,
        "variant": variant,
        "window": window,
        "n_models": window,
        "score": 0.25 + step / 1000,
        "mtv": None,
        "is": 0.5,
        "time": 1000.0 + step,
    }
    rec.update(kw)
    return rec


def raw_lines(path) -> list[dict]:
    """The independent oracle: every non-blank line of the file through plain json.loads."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_append_reload_round_trip(tmp_path):
    h = History(tmp_path / "run")
    assert (tmp_path / "run" / "examples").is_dir()
    assert h.records() == [] and h.errors() == [] and h.last_step() is None
    recs = [score(10), score(10, variant="avg", window=4, mtv=0.01), score(20, task="mean")]
    h.append(recs[0])
    h.append_many(recs[1:])
    assert raw_lines(h.root / "history.jsonl") == recs
    assert h.records() == recs
    assert h.records(variant="avg") == [recs[1]]
    assert h.records(task="mean") == [recs[2]]
    assert h.records(window=1, task="hellaswag") == [recs[0]]
    assert h.last_step() == 20
    again = History(tmp_path / "run")
    assert again.records() == recs
    assert again.last_step() == 20


def test_time_is_filled_and_lines_are_compact(tmp_path):
    h = History(tmp_path)
    rec = score(1)
    del rec["time"]
    h.append(rec)
    text = (tmp_path / "history.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == 1 and ", " not in text
    (line,) = raw_lines(tmp_path / "history.jsonl")
    assert isinstance(line["time"], float) and line["time"] > 1e9
    assert History(tmp_path).records() == h.records() == [line]


def test_error_lines_kept_apart(tmp_path):
    h = History(tmp_path)
    h.append(score(5))
    h.append_error(6, "eval", "CUDA out of memory", task="hellaswag", variant="ens")
    h.append(score(6))
    h.append_error(7, "capture", "disk full")
    on_disk = raw_lines(tmp_path / "history.jsonl")
    assert len(on_disk) == 4
    assert on_disk[1] == {
        "step": 6,
        "phase": "eval",
        "task": "hellaswag",
        "variant": "ens",
        "error": "CUDA out of memory",
    }
    assert on_disk[3] == {"step": 7, "phase": "capture", "task": None, "variant": None, "error": "disk full"}
    for hist in (h, History(tmp_path)):
        assert hist.records() == [on_disk[0], on_disk[2]]
        assert hist.errors() == [on_disk[1], on_disk[3]]
        assert hist.last_step() == 7


def test_torn_last_line_is_truncated_and_appends_continue(tmp_path, caplog):
    h = History(tmp_path)
    h.append_many([score(1), score(2)])
    path = tmp_path / "history.jsonl"
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "ta')
    with caplog.at_level(logging.INFO, logger="checkpoint_stability.history"):
        h2 = History(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert path.read_bytes() == good
    assert h2.records() == [score(1), score(2)]
    h2.append(score(3))
    assert raw_lines(path) == [score(1), score(2), score(3)]
    assert History(tmp_path).records() == [score(1), score(2), score(3)]


def test_torn_examples_line_is_truncated(tmp_path):
    h = History(tmp_path)
    h.append_outputs("arc", 1, "raw", 1, ["A"], [True])
    path = tmp_path / "examples" / "arc.jsonl"
    good = path.read_bytes()
    path.write_bytes(good + b'{"step": 2, "variant": "r')
    h2 = History(tmp_path)
    assert path.read_bytes() == good
    h2.append_outputs("arc", 2, "raw", 1, ["B"], [False])
    assert [line["step"] for line in raw_lines(path)] == [1, 2]
    assert [o["step"] for o in History(tmp_path).outputs("arc")] == [1, 2]


def test_valid_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(score(1)) + "\n" + json.dumps(score(2)))
    h = History(tmp_path)
    assert h.records() == [score(1), score(2)]
    h.append(score(3))
    assert raw_lines(path) == [score(1), score(2), score(3)]


def test_garbage_in_the_middle_is_skipped_with_one_warning(tmp_path, caplog):
    path = tmp_path / "history.jsonl"
    lines = [
        json.dumps(score(1)),
        "not json at all",
        "",
        "[1, 2, 3]",
        json.dumps({"step": 2, "task": "x"}),  # lacks keys
        json.dumps(score(2, window="4")),  # wrong type
        '{"step": 2, "score": NaN}',
        json.dumps(score(3)),
    ]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="checkpoint_stability.history"):
        h = History(tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "history.jsonl" in warnings[0].getMessage() and "5" in warnings[0].getMessage()
    assert h.records() == [score(1), score(3)]
    assert path.read_bytes() == before  # damaged lines are left in place
    h.append(score(4))
    assert History(tmp_path).records() == [score(1), score(3), score(4)]


def test_invalid_utf8_line_is_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n" + json.dumps(score(1)).encode() + b"\n")
    assert History(tmp_path).records() == [score(1)]


def test_truncate_after_drops_exactly_the_later_lines(tmp_path):
    h = History(tmp_path)
    h.write_meta("arc", "multiple_choice", "acc", ["q1", "q2"], [0, 1])
    h.write_meta("gsm", "generation", "exact_match", ["g1"], ["42"])
    for step in (10, 20, 30):
        h.append_many([score(step, task="arc"), score(step, task="arc", variant="avg", window=2)])
        h.append_outputs("arc", step, "raw", 1, [0, 0], [True, False], [[-0.1, -2.0], [-0.3, -1.0]])
        h.append_outputs("gsm", step, "avg", 2, ["42"], [True])
    h.append_error(25, "eval", "boom")
    h.append_error(15, "eval", "boom")
    gsm_path = tmp_path / "examples" / "gsm.jsonl"
    meta_bytes = (tmp_path / "examples" / "arc.meta.json").read_bytes()

    assert h.truncate_after(30) == 0
    assert h.truncate_after(20) == 2 + 1 + 1 + 1  # scores@30, error@25, arc@30, gsm@30

    hist = raw_lines(tmp_path / "history.jsonl")
    assert [(r["step"], "error" in r) for r in hist] == [
        (10, False),
        (10, False),
        (20, False),
        (20, False),
        (15, True),
    ]
    assert [r["step"] for r in raw_lines(tmp_path / "examples" / "arc.jsonl")] == [10, 20]
    assert [r["step"] for r in raw_lines(gsm_path)] == [10, 20]
    assert (tmp_path / "examples" / "arc.meta.json").read_bytes() == meta_bytes
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    for hh in (h, History(tmp_path)):
        assert [r["step"] for r in hh.records()] == [10, 10, 20, 20]
        assert [e["step"] for e in hh.errors()] == [15]
        assert [o["step"] for o in hh.outputs("arc")] == [10, 20]
        assert hh.outputs("arc")[1]["choice_logprobs"] == [[-0.1, -2.0], [-0.3, -1.0]]
        assert hh.meta("gsm")["targets"] == ["42"]
        assert hh.last_step() == 20

    untouched = gsm_path.stat().st_mtime_ns
    assert h.truncate_after(20) == 0
    assert gsm_path.stat().st_mtime_ns == untouched
    h.append(score(21, task="arc"))
    assert h.last_step() == 21
    assert h.truncate_after(-1) == 6 + 4
    assert raw_lines(tmp_path / "history.jsonl") == [] and History(tmp_path).last_step() is None


def test_truncate_after_keeps_damaged_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(score(1)) + "\ngarbage\n" + json.dumps(score(2)) + "\n")
    h = History(tmp_path)
    assert h.truncate_after(1) == 1
    assert path.read_text() == json.dumps(score(1)) + "\ngarbage\n"
    assert History(tmp_path).records() == [score(1)]


def test_write_meta_idempotent_and_conflict(tmp_path):
    h = History(tmp_path)
    h.write_meta("arc", "multiple_choice", "acc", ["q1", "q2"], [0, 3])
    path = tmp_path / "examples" / "arc.meta.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == {
        "task": "arc",
        "kind": "multiple_choice",
        "metric": "acc",
        "example_ids": ["q1", "q2"],
        "targets": [0, 3],
    }
    assert h.meta("arc") == on_disk and h.meta("other") is None
    mtime = path.stat().st_mtime_ns
    h.write_meta("arc", "multiple_choice", "acc", ("q1", "q2"), (0, 3))
    History(tmp_path).write_meta("arc", "multiple_choice", "acc", ["q1", "q2"], [0, 3])
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"changed since the run directory was created.*arc\.meta\.json"):
        History(tmp_path).write_meta("arc", "multiple_choice", "acc", ["q1", "q3"], [0, 3])
    with pytest.raises(ValueError, match="new task name"):
        h.write_meta("arc", "multiple_choice", "acc", ["q1", "q2"], [0, 1])
    with pytest.raises(ValueError, match="metric='f1'"):
        h.write_meta("arc", "multiple_choice", "f1", ["q1", "q2"], [0, 3])
    assert json.loads(path.read_text()) == on_disk
    assert History(tmp_path).meta("arc") == on_disk


def test_damaged_meta_is_ignored_then_rewritten(tmp_path, caplog):
    (tmp_path / "examples").mkdir()
    path = tmp_path / "examples" / "arc.meta.json"
    path.write_text('{"task": "arc", "kin')
    with caplog.at_level(logging.WARNING, logger="checkpoint_stability.history"):
        h = History(tmp_path)
    assert h.meta("arc") is None
    assert any("arc.meta.json" in r.getMessage() for r in caplog.records)
    h.write_meta("arc", "multiple_choice", "acc", [1], [0])
    assert History(tmp_path).meta("arc")["example_ids"] == [1]


def test_minus_inf_logprobs_round_trip(tmp_path):
    h = History(tmp_path)
    lp = [[-0.5, float("-inf")], [float("-inf"), -2.25]]
    h.append_outputs("arc", 3, "ens", 4, [0, 1], [True, True], choice_logprobs=lp)
    h.append_outputs("arc", 4, "ens", 4, [1, 1], [False, True])
    (first, second) = raw_lines(tmp_path / "examples" / "arc.jsonl")
    assert first == {
        "step": 3,
        "variant": "ens",
        "window": 4,
        "outputs": [0, 1],
        "correct": [True, True],
        "choice_logprobs": [[-0.5, None], [None, -2.25]],
    }
    assert "choice_logprobs" not in second
    for hh in (h, History(tmp_path)):
        out = hh.outputs("arc")
        assert out[0]["choice_logprobs"] == lp
        assert math.isinf(out[0]["choice_logprobs"][0][1])
        assert "choice_logprobs" not in out[1]
        assert hh.outputs("arc", variant="raw") == [] and len(hh.outputs("arc", window=4)) == 2
        assert hh.last_step() == 4
    with pytest.raises(ValueError, match="choice_logprobs"):
        h.append_outputs("arc", 5, "ens", 4, [0], [True], [[float("nan")]])
    with pytest.raises(ValueError, match="choice_logprobs"):
        h.append_outputs("arc", 5, "ens", 4, [0], [True], [[float("inf")]])
    with pytest.raises(ValueError, match="outputs"):
        h.append_outputs("arc", 5, "ens", 4, [float("-inf")], [True])
    with pytest.raises(ValueError, match="correct"):
        h.append_outputs("arc", 5, "ens", 4, [0, 1], [True])
    assert len(raw_lines(tmp_path / "examples" / "arc.jsonl")) == 2


def test_outputs_must_match_meta_length(tmp_path):
    h = History(tmp_path)
    h.write_meta("arc", "multiple_choice", "acc", ["a", "b"], [0, 1])
    with pytest.raises(ValueError, match="example_ids"):
        h.append_outputs("arc", 1, "raw", 1, [0], [True])
    assert h.outputs("arc") == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None, True])
def test_bad_score_rejected(tmp_path, bad):
    h = History(tmp_path)
    with pytest.raises(ValueError, match="score"):
        h.append(score(1, score=bad))
    assert h.records() == []
    assert not (tmp_path / "history.jsonl").exists() or raw_lines(tmp_path / "history.jsonl") == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", ".", "..", "a\\b", "a\0b", "x" * 201, None])
def test_bad_task_names_rejected(tmp_path, bad):
    h = History(tmp_path)
    with pytest.raises(ValueError, match="task name"):
        h.write_meta(bad, "multiple_choice", "acc", [1], [0])
    with pytest.raises(ValueError, match="task name"):
        h.append_outputs(bad, 1, "raw", 1, [0], [True])
    with pytest.raises(ValueError, match="task name"):
        h.append(score(1, task=bad))
    assert list((tmp_path / "examples").iterdir()) == []


def test_long_but_valid_task_name_and_mean(tmp_path):
    h = History(tmp_path)
    h.append_outputs("x" * 200, 1, "raw", 1, [0], [True])
    h.append(score(1, task="mean"))
    assert len(History(tmp_path).outputs("x" * 200)) == 1


def test_missing_or_extra_key_rejected(tmp_path):
    h = History(tmp_path)
    rec = score(1)
    del rec["mtv"]
    with pytest.raises(ValueError, match="'mtv'"):
        h.append(rec)
    with pytest.raises(ValueError, match="'extra'"):
        h.append(score(1, extra=1))
    with pytest.raises(ValueError, match=r"\[1\].*'window'"):
        h.append_many([score(1), score(2, window=0)])
    with pytest.raises(ValueError, match="step"):
        h.append(score(-1))
    assert h.records() == [] and History(tmp_path).records() == []


def test_numpy_like_values_are_converted(tmp_path):
    np = pytest.importorskip("numpy")
    h = History(tmp_path)
    h.append(score(np.int64(7), score=np.float32(0.5), window=np.int64(2)))
    logprobs = np.array([[-1.0, -np.inf]] * 2)
    h.append_outputs("arc", 7, "avg", 2, np.array([1, 2]), np.array([True, False]), logprobs)
    back = History(tmp_path)
    assert back.records()[0]["step"] == 7 and back.records()[0]["score"] == 0.5
    assert back.outputs("arc")[0]["correct"] == [True, False]
    assert back.outputs("arc")[0]["choice_logprobs"][1] == [-1.0, -math.inf]


def test_atomic_write_helpers(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "one\n")
    atomic_write_bytes(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
