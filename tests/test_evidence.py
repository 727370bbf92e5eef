"""Selection evidence end to end: selection reads only the selection half, best.json's comparison and
intervals equal independent recomputations from the run directory, bad holdouts are refused."""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_training import EXAMPLES, classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityConfig, StabilityMonitor
from checkpoint_stability.holdout import HoldoutTooSmallError
from checkpoint_stability.live_series import LiveSeries
from checkpoint_stability.tasks.base import TaskResult

HOLDOUT = 0.5


def confirmation_indices(task: str, ids: list, fraction: float = HOLDOUT) -> list[int]:
    """DESIGN.md's rule, written out again: sha256 of "<task>/<id>", first 8 hex digits / 2**32 < h."""
    return [
        i
        for i, example_id in enumerate(ids)
        if int(hashlib.sha256(f"{task}/{json.dumps(example_id)}".encode()).hexdigest()[:8], 16) / 2**32
        < fraction
    ]


def numpy_bootstrap(groups: list[list[float]], seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """The percentile interval of the mean over groups of each group's resampled mean, drawn group after
    group from one generator, the plain way (no blocks)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for group in groups:
        values = np.asarray(group, dtype=np.float64)
        means += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    means /= len(groups)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def run(tmp_path, name, tasks, steps=40, **settings):
    monitor = StabilityMonitor(
        tasks,
        dirpath=tmp_path / name,
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        report=False,
        holdout=HOLDOUT,
        **settings,
    )
    train(steps, monitor)
    monitor.close()
    return monitor


def read(run_dir, name):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_a_change_on_the_confirmation_half_does_not_move_the_choice(tmp_path):
    x, y = make_data(3)
    held_out = set(confirmation_indices("cls", list(range(EXAMPLES))))
    assert 5 <= len(held_out) <= EXAMPLES - 5

    def corrupted(step_of):
        """The model's answers, except on held-out examples: there, a different wrong answer at every
        evaluation, so every confirmation score moves and selection would follow if it read them."""

        def predict(model):
            step_of[0] += 1
            rows = torch.log_softmax(model(x), dim=-1).tolist()
            for i in held_out:
                wrong = (y[i].item() + 1 + step_of[0] % 3) % 4
                rows[i] = [0.0 if c == wrong else -5.0 - c for c in range(4)]
            return {"choice_logprobs": rows}

        return predict

    honest = run(tmp_path, "honest", [classify_task(x, y)])
    counter = [0]
    changed = run(
        tmp_path,
        "changed",
        [FunctionTask("cls", corrupted(counter), targets=y.tolist(), kind="multiple_choice")],
    )
    a, b = (json.loads((m.dirpath / "best.json").read_text()) for m in (honest, changed))
    for key in ("step", "variant", "path", "steps", "selection_score"):
        assert a[key] == b[key], key
    assert a["evidence"]["chosen"]["confirmation_score"] != b["evidence"]["chosen"]["confirmation_score"]
    # Every selection score is the same in both runs, and every confirmation score of raw differs.
    ra = {(r["step"], r["task"], r["variant"]): r for r in read(honest.dirpath, "history.jsonl")}
    rb = {(r["step"], r["task"], r["variant"]): r for r in read(changed.dirpath, "history.jsonl")}
    assert ra.keys() == rb.keys()
    for key in ra:
        assert ra[key]["selection_score"] == rb[key]["selection_score"], key
    assert all(ra[k]["confirmation_score"] != rb[k]["confirmation_score"] for k in ra if k[2] == "raw")
    # The exported weights are the same.
    path = f"{a['path']}/model.safetensors"
    with safe_open(honest.dirpath / path, "pt") as left, safe_open(changed.dirpath / path, "pt") as right:
        assert sorted(left.keys()) == sorted(right.keys())
        assert all(torch.equal(left.get_tensor(k), right.get_tensor(k)) for k in left.keys())


def test_records_carry_both_halves_recomputed_from_the_examples(tmp_path):
    x, y = make_data(4)
    monitor = run(tmp_path, "r", [classify_task(x, y)])
    meta = json.loads((monitor.dirpath / "examples" / "cls.meta.json").read_text())
    held_out = confirmation_indices("cls", meta["example_ids"])
    kept = [i for i in range(EXAMPLES) if i not in held_out]
    lines = {(line["step"], line["variant"]): line for line in read(monitor.dirpath, "examples/cls.jsonl")}
    records = [r for r in read(monitor.dirpath, "history.jsonl") if r["task"] == "cls"]
    assert records
    for record in records:
        correct = lines[(record["step"], record["variant"])]["correct"]
        assert record["selection_score"] == pytest.approx(
            math.fsum(correct[i] for i in kept) / len(kept), abs=1e-12
        )
        assert record["confirmation_score"] == pytest.approx(
            math.fsum(correct[i] for i in held_out) / len(held_out), abs=1e-12
        )
    # One task: the mean record's halves are the task's.
    means = {
        (r["step"], r["variant"]): r for r in read(monitor.dirpath, "history.jsonl") if r["task"] == "mean"
    }
    for record in records:
        mean = means[(record["step"], record["variant"])]
        assert mean["selection_score"] == pytest.approx(record["selection_score"], abs=1e-12)


def test_best_json_evidence_equals_a_replay_of_the_history_and_a_numpy_bootstrap(tmp_path):
    x, y = make_data(5)
    monitor = run(
        tmp_path,
        "e",
        [classify_task(x, y, "a"), classify_task(x, y[torch.randperm(EXAMPLES)], "b")],
        steps=50,
    )
    best = json.loads((monitor.dirpath / "best.json").read_text())
    evidence = best["evidence"]
    assert evidence["holdout"] == HOLDOUT and evidence["examples"] == "confirmation"
    mean = [r for r in read(monitor.dirpath, "history.jsonl") if r["task"] == "mean"]
    steps = sorted({r["step"] for r in mean})
    raw = [r for r in mean if r["variant"] == "raw"]
    # The naive pick: the raw checkpoint with the highest selection score (the earliest of ties).
    top = max(r["selection_score"] for r in raw)
    naive = next(r for r in raw if r["selection_score"] == top)
    assert (evidence["naive"]["step"], evidence["naive"]["confirmation_score"]) == (
        naive["step"],
        naive["confirmation_score"],
    )
    assert evidence["final_raw"]["step"] == steps[-1] == evidence["as_of"]
    # Candidates under select="avg": the average from the second snapshot on (min_snapshots=2).
    candidates = [r for r in mean if r["variant"] == "avg" and r["step"] >= steps[1]]
    chosen = next(r for r in candidates if (r["step"], r["variant"]) == (best["step"], best["variant"]))
    assert (
        chosen["selection_score"] == max(r["selection_score"] for r in candidates) == best["selection_score"]
    )
    assert evidence["chosen"]["confirmation_score"] == chosen["confirmation_score"]
    regret = max(r["confirmation_score"] for r in candidates) - chosen["confirmation_score"]
    assert evidence["regret"] == pytest.approx(regret, abs=1e-12)

    # Intervals at the chosen step, stratified by task, from the stored per-example results.
    groups = {}
    for task in ("a", "b"):
        meta = json.loads((monitor.dirpath / "examples" / f"{task}.meta.json").read_text())
        held_out = confirmation_indices(task, meta["example_ids"])
        for line in read(monitor.dirpath, f"examples/{task}.jsonl"):
            if line["step"] == best["step"]:
                groups.setdefault(line["variant"], []).append([line["correct"][i] for i in held_out])
    intervals = evidence["intervals"]
    low, high = numpy_bootstrap(groups["avg"])
    assert (intervals["score"]["low"], intervals["score"]["high"]) == pytest.approx((low, high), abs=1e-12)
    for name, variant in (("avg_minus_raw", "avg"), ("ens_minus_raw", "ens")):
        differences = [
            np.subtract(v, r).tolist() for v, r in zip(groups[variant], groups["raw"], strict=True)
        ]
        low, high = numpy_bootstrap(differences)
        assert (intervals[name]["low"], intervals[name]["high"]) == pytest.approx((low, high), abs=1e-12), (
            name
        )
        estimate = np.mean(
            [np.mean(v) - np.mean(r) for v, r in zip(groups[variant], groups["raw"], strict=True)]
        )
        assert intervals[name]["estimate"] == pytest.approx(estimate, abs=1e-12)
        assert intervals[name]["resamples"] == 1000 and intervals[name]["seed"] == 0


def test_a_resumed_run_rebuilds_the_same_evidence(tmp_path):
    x, y = make_data(6)
    whole = run(tmp_path, "whole", [classify_task(x, y)])
    first = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=tmp_path / "parts",
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        report=False,
        holdout=HOLDOUT,
    )
    train(40, first)  # the same trajectory; the "crash" comes after step 40's snapshot is recorded
    first.abandon()
    resumed = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=tmp_path / "parts",
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        report=False,
        holdout=HOLDOUT,
    )
    resumed.open(resume_step=40)
    assert (
        resumed.evidence.to_json(resumed.best)
        == json.loads((tmp_path / "whole" / "best.json").read_text())["evidence"]
    )
    resumed.close()
    assert json.loads((tmp_path / "parts" / "best.json").read_text()) == json.loads(
        (whole.dirpath / "best.json").read_text()
    )


def test_without_holdout_the_evidence_is_on_all_examples(tmp_path):
    x, y = make_data(7)
    monitor = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        report=False,
    )
    train(30, monitor)
    monitor.close()
    best = json.loads((tmp_path / "best.json").read_text())
    evidence = best["evidence"]
    assert evidence["holdout"] is None and evidence["examples"] == "all"
    assert "selection_score" not in best
    assert evidence["chosen"]["confirmation_score"] == best["score"]
    assert all("selection_score" not in r for r in read(tmp_path, "history.jsonl"))
    assert best["evidence"]["intervals"]["score"]["estimate"] == pytest.approx(best["score"], abs=1e-12)


@pytest.mark.parametrize("holdout", [0, 1, -0.5, 1.5, "0.5", True, float("nan")])
def test_a_holdout_outside_zero_one_is_refused(holdout):
    with pytest.raises(ValueError, match="holdout must be a real number strictly between 0 and 1"):
        StabilityConfig(holdout=holdout)


def test_too_few_examples_to_split_is_refused_naming_the_task_and_counts(tmp_path):
    small = FunctionTask("tiny", lambda model: [0, 1, 0], targets=[0, 1, 1])
    with pytest.raises(
        HoldoutTooSmallError, match=r"task 'tiny': holdout=0.5 leaves 2 selection and 1 confirmation"
    ):
        StabilityMonitor([small], dirpath=tmp_path, holdout=0.5)

    class Opaque:
        """A task whose examples are only known once it runs: the first evaluation raises, whatever
        on_error says (selection on one example is not selection)."""

        name, kind, metric = "opaque", "function", "exact_match"

        def evaluate(self, model):
            return TaskResult(
                outputs=[0, 1, 0], correct=[1.0, 1.0, 0.0], targets=[0, 1, 1], example_ids=[0, 1, 2]
            )

        def score(self, outputs):
            return [float(o == t) for o, t in zip(outputs, [0, 1, 1], strict=True)]

    monitor = StabilityMonitor(
        [Opaque()], dirpath=tmp_path / "o", holdout=0.5, console=False, on_error="warn"
    )
    with pytest.raises(HoldoutTooSmallError, match="task 'opaque'"):
        monitor.on_snapshot(torch.nn.Linear(2, 2), 1)
    monitor.abandon()


def test_a_task_whose_examples_cannot_be_split_is_unavailable_once(caplog):
    task = FunctionTask("ok", lambda model: [0] * 8, targets=[0] * 8)
    series = LiveSeries([task], StabilityConfig(holdout=0.5, window=2))
    strange = TaskResult(
        outputs=[0, 1, 0, 1], correct=[1.0, 0.0, 1.0, 0.0], targets=[0] * 4, example_ids=[{1, 2}, 2, 3, 4]
    )
    with caplog.at_level(logging.WARNING):
        assert series.halves("odd", strange) is None
        assert series.halves("odd", strange) is None
    assert series.unavailable == {"odd"}
    assert sum("cannot be split" in r.message for r in caplog.records) == 1


def test_the_end_of_run_summary_prints_the_comparison(tmp_path):
    x, y = make_data(8)
    printed = []
    monitor = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=tmp_path,
        window=3,
        every_n_steps=5,
        tensorboard=False,
        report=False,
        holdout=HOLDOUT,
        printer=printed.append,
    )
    train(30, monitor)
    monitor.close()
    best = json.loads((tmp_path / "best.json").read_text())
    evidence = best["evidence"]
    text = "\n".join(printed)
    assert "on the confirmation half (holdout=0.5: examples selection never read)" in text
    chosen = evidence["chosen"]
    assert (
        f"chosen       step {chosen['step']} {chosen['variant']:<4} {chosen['confirmation_score']:.3f}"
        in text
    )
    assert f"naive pick   step {evidence['naive']['step']} raw" in text
    assert (
        f"avg - raw at step {chosen['step']}: {evidence['intervals']['avg_minus_raw']['estimate']:+.3f}"
        in text
    )


def test_the_best_command_shows_the_evidence(tmp_path, capsys):
    from checkpoint_stability.offline.cli import main

    x, y = make_data(9)
    monitor = run(tmp_path, "cli", [classify_task(x, y)], steps=30)
    best = json.loads((monitor.dirpath / "best.json").read_text())
    assert main(["best", str(monitor.dirpath)]) == 0
    out = capsys.readouterr().out
    assert f"selection half: {best['selection_score']:.6g}" in out
    assert "mean score on the confirmation half (holdout=0.5" in out
    assert f"naive pick   step {best['evidence']['naive']['step']} raw" in out
