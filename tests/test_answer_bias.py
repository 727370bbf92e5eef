"""Answer bias of choice tasks (issue 17, item 4): each variant's majority share and balanced accuracy in
the history, checked against hand counts from the per-example outputs on disk, and the report's flag
for a variant that collapsed onto one answer while raw did not."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tiny_training import classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.history import History
from checkpoint_stability.reporting.report import write_report


def hand_majority_share(outputs: list) -> float:
    counts = Counter(outputs)
    return max(counts.values()) / len(outputs)


def hand_balanced_accuracy(outputs: list, targets: list) -> float:
    recalls = []
    for label in sorted(set(targets)):
        rows = [i for i, t in enumerate(targets) if t == label]
        recalls.append(sum(outputs[i] == label for i in rows) / len(rows))
    return sum(recalls) / len(recalls)


def test_choice_task_records_carry_majority_share_and_balanced_accuracy(tmp_path):
    x, y = make_data(4)
    free_form = FunctionTask(
        "free",
        lambda model: [str(v) for v in model(x).argmax(-1).tolist()],
        targets=[str(v) for v in y.tolist()],
    )
    monitor = StabilityMonitor(
        [classify_task(x, y), free_form], dirpath=tmp_path, window=3, every_n_steps=5, console=False
    )
    train(20, monitor)
    monitor.close()
    targets = json.loads((tmp_path / "examples" / "cls.meta.json").read_text())["targets"]
    lines = [json.loads(line) for line in (tmp_path / "examples" / "cls.jsonl").read_text().splitlines()]
    outputs = {(line["step"], line["variant"]): line["outputs"] for line in lines}
    records = History(tmp_path).records()
    checked = 0
    for record in records:
        if record["task"] == "cls":
            got = outputs[(record["step"], record["variant"])]
            assert record["majority_share"] == pytest.approx(hand_majority_share(got), abs=1e-12)
            assert record["balanced_accuracy"] == pytest.approx(
                hand_balanced_accuracy(got, targets), abs=1e-12
            )
            checked += 1
        else:  # the mean over tasks, and a free-form task, have no answer set to be biased towards
            assert "majority_share" not in record and "balanced_accuracy" not in record
    assert checked == 4 * 3  # 4 snapshots x raw, avg, ens


def test_a_history_record_with_a_bias_field_out_of_range_is_refused(tmp_path):
    history = History(tmp_path)
    record = {"step": 1, "task": "t", "variant": "raw", "window": 1, "n_models": 1, "score": 0.5,
              "mtv": None, "is": None, "majority_share": 1.5}  # fmt: skip
    with pytest.raises(ValueError, match=r"majority_share.*not a share"):
        history.append(record)
    history.append(dict(record, majority_share=0.75, balanced_accuracy=0.5))
    assert History(tmp_path).records()[0]["majority_share"] == 0.75


def test_the_report_flags_a_variant_that_collapsed_onto_one_answer(tmp_path):
    x, y = make_data(6)
    monitor = StabilityMonitor(
        [classify_task(x, y)], dirpath=tmp_path, window=2, every_n_steps=5, console=False
    )
    train(30, monitor)
    monitor.close()
    # Make the avg series collapse (share 1.0) while raw's stays spread (0.5): a crafted history.
    path = tmp_path / "history.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line.get("task") == "cls":
            line["majority_share"] = {"raw": 0.5, "avg": 1.0, "ens": 0.6}[line["variant"]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = write_report(tmp_path).read_text()
    section = report.split("## Answer bias", 1)[1].split("\n## ", 1)[0]
    rows = {row.split("|")[2].strip(): row for row in section.splitlines() if row.startswith("| cls")}
    assert "collapsed onto one answer" in rows["avg, window 2"] and "1.000" in rows["avg, window 2"]
    assert "collapsed" not in rows["ens, window 2"] and "collapsed" not in rows["raw (live model)"]
    assert torch.is_tensor(x)  # the data the run evaluated
