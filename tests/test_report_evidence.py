"""Selection evidence in the report (issue 17): "Does the choice hold up?", the confirmation columns,
the weight drift and its jumps, and the recommended window.

Run directories are built by hand with :class:`History` and a hand-written ``best.json``, so every
expected value is known before the report runs: table values are the ones written; jumps come from a
median computed here; votes are counted here with ``Counter`` (ties to the newest snapshot, as DESIGN.md
says); per-example means are taken with numpy and handed to ``paired_difference`` directly; and the
window rule is applied by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from checkpoint_stability.bootstrap import paired_difference
from checkpoint_stability.history import History
from checkpoint_stability.holdout import is_confirmation
from checkpoint_stability.reporting.report import average_window_rows, ensemble_window_rows, write_report
from checkpoint_stability.reporting.summary import format_summary, summarize

pytest.importorskip("matplotlib")

TASK = "qa"


# ------------------------------------------------------------------------------------------- run builders


def new_run(root: Path, n_examples: int) -> History:
    history = History(root)
    history.write_meta(
        TASK,
        kind="multiple_choice",
        metric="exact_match",
        example_ids=list(range(n_examples)),
        targets=[0] * n_examples,
    )
    return history


def evaluate(history: History, step: int, variant: str, window: int, correct: list[int], **fields) -> None:
    """One evaluation: its examples line (output 0 is the right answer, 1 a wrong one) and its record."""
    outputs = [0 if c else 1 for c in correct]
    history.append_outputs(TASK, step, variant, window, outputs, [float(c) for c in correct])
    n_models = 1 if variant == "raw" else window
    score = sum(correct) / len(correct)
    record = {"step": step, "task": TASK, "variant": variant, "window": window, "n_models": n_models,
              "score": score, "mtv": None, "is": None, **fields}  # fmt: skip
    history.append(record)


def interval(estimate: float, low: float, high: float) -> dict:
    return {"estimate": estimate, "low": low, "high": high, "resamples": 1000, "seed": 0, "confidence": 0.95}


def write_best(root: Path, step: int, evidence: dict | None = None) -> dict:
    """A best.json for an avg export at ``step`` (its weights file exists, so the pointer is valid)."""
    name = f"step-{step:08d}-avg"
    (root / "exports" / name).mkdir(parents=True)
    (root / "exports" / name / "model.safetensors").write_bytes(b"weights")
    best = {"path": f"exports/{name}", "step": step, "variant": "avg", "window": 3, "steps": [step],
            "score": 0.6, "scores": {TASK: 0.6}, "metric": "mean", "mode": "max"}  # fmt: skip
    best["select"] = "avg"
    if evidence is not None:
        best["evidence"] = evidence
    (root / "best.json").write_text(json.dumps(best))
    return best


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def headings(text: str) -> list[str]:
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row that is not a header separator."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


EVIDENCE = {
    "holdout": 0.5,
    "examples": "confirmation",
    "metric": "mean",
    "as_of": 500,
    "chosen": {"step": 500, "variant": "avg", "selection_score": 0.61, "confirmation_score": 0.58},
    "naive": {"step": 300, "variant": "raw", "selection_score": 0.66, "confirmation_score": 0.52},
    "final_raw": {"step": 500, "variant": "raw", "selection_score": 0.55, "confirmation_score": 0.54},
    "best_candidate": {"step": 400, "variant": "avg", "selection_score": 0.6, "confirmation_score": 0.5925},
    "regret": 0.0125,
    "intervals": {
        "score": interval(0.58, 0.5512, 0.6134),
        "avg_minus_raw": interval(0.012, -0.004, 0.029),
        "ens_minus_raw": interval(-0.05, -0.09, -0.011),
    },
    "unavailable": ["gen", "sum"],
}


def small_run(root: Path, *, holdout_fields: bool = True, steps: int = 5) -> History:
    """Five raw and avg evaluations of 8 examples; with ``holdout_fields`` each record carries its two
    halves' scores (values chosen here, not computed)."""
    history = new_run(root, 8)
    for k in range(1, steps + 1):
        for variant, window in (("raw", 1), ("avg", 3)):
            correct = [(i + k + (variant == "avg")) % 3 != 0 for i in range(8)]
            fields = {}
            if holdout_fields:
                fields = {
                    "selection_score": 0.05 * k,
                    "confirmation_score": 0.04 * k + (0.3 if window > 1 else 0),
                }
            evaluate(history, 100 * k, variant, window, [int(c) for c in correct], **fields)
    return history


# ------------------------------------------------------------------------------ does the choice hold up?


def test_the_evidence_table_shows_what_best_json_says(tmp_path):
    small_run(tmp_path)
    write_best(tmp_path, 500, EVIDENCE)
    text = write_report(tmp_path).read_text()
    assert headings(text).index("Does the choice hold up?") == headings(text).index("Best model") + 1
    part = section(text, "Does the choice hold up?")
    rows = {row[0]: row[1:] for row in table_rows(part)}
    for key, label in (
        ("chosen", "chosen (`best.json`)"),
        ("naive", "naive: the raw checkpoint with the best selection score"),
        ("final_raw", "final raw: the newest raw checkpoint"),
        ("best_candidate", "best candidate: the best confirmation score under `select`"),
    ):
        entry = EVIDENCE[key]
        assert rows[label] == [
            str(entry["step"]),
            entry["variant"],
            f"{entry['selection_score']:.4f}",
            f"{entry['confirmation_score']:.4f}",
        ]
    assert "- **Regret**: 0.0125 —" in part
    assert "`holdout=0.5`" in part and "biased upward" not in part
    # The intervals as the brief's example writes them, each difference with its verdict.
    assert "- **Chosen score**: 0.580 [0.551, 0.613], 95%, 1,000 resamples, seed 0\n" in part
    assert (
        "- **avg − raw**: +0.012 [−0.004, +0.029], 95%, 1,000 resamples, seed 0: "
        "not distinguishable from raw\n" in part
    )
    assert (
        "- **ens − raw**: −0.050 [−0.090, −0.011], 95%, 1,000 resamples, seed 0: significantly worse than raw"
        in part
    )
    assert "at the chosen step 500" in part and "over the confirmation examples" in part
    # The tasks without confirmation scores, named once.
    assert part.count("`gen`") == 1 and "could not be computed for task(s) `gen`, `sum`" in part


def test_a_significantly_positive_difference_reads_better_than_raw(tmp_path):
    small_run(tmp_path)
    evidence = dict(EVIDENCE, intervals={"score": None, "avg_minus_raw": interval(0.03, 0.001, 0.06)})
    write_best(tmp_path, 500, evidence)
    part = section(write_report(tmp_path).read_text(), "Does the choice hold up?")
    assert (
        "- **avg − raw**: +0.030 [+0.001, +0.060], 95%, 1,000 resamples, seed 0: "
        "significantly better than raw" in part
    )
    assert "Chosen score" not in part and "ens − raw" not in part


def test_without_holdout_the_section_says_the_scores_are_biased_and_how_to_hold_out(tmp_path):
    small_run(tmp_path, holdout_fields=False)
    evidence = dict(EVIDENCE, holdout=None, examples="all", unavailable=[])
    write_best(tmp_path, 500, evidence)
    text = write_report(tmp_path).read_text()
    part = section(text, "Does the choice hold up?")
    assert "**No holdout**" in part and "biased upward" in part and "`holdout=0.5`" in part
    assert "selection score (all examples) | confirmation score (the same examples)" in part
    assert "over all examples at the chosen step 500" in part
    assert "could not be computed" not in part
    # Records without holdout fields keep the old table layout.
    assert "confirmation score, final" not in section(
        text, "Stability: final 20% of evaluations and whole run"
    )


def test_unusable_evidence_is_named_and_the_rest_of_the_report_stands(tmp_path, caplog):
    small_run(tmp_path)
    write_best(tmp_path, 500, dict(EVIDENCE, regret="large"))
    text = write_report(tmp_path).read_text()
    part = section(text, "Does the choice hold up?")
    assert "selection evidence that cannot be used: regret is not a number" in part
    assert "| model |" not in part
    assert "- **Step**: 500" in section(text, "Best model")
    assert any("selection evidence is left out" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------- confirmation columns


def test_confirmation_scores_get_their_own_columns_beside_the_scores(tmp_path):
    small_run(tmp_path)
    text = write_report(tmp_path).read_text()
    table = section(text, "Stability: final 20% of evaluations and whole run")
    header, *rows = table_rows(table)
    by_series = {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in rows}
    # Hand: 5 evaluations, final 20% = the last 2 (k = 4, 5); confirmation = 0.04 k (+ 0.3 for avg).
    final_raw = (0.04 * 4 + 0.04 * 5) / 2
    whole_raw = sum(0.04 * k for k in range(1, 6)) / 5
    assert by_series[(TASK, "raw")]["confirmation score, final 20%"] == f"{final_raw:.4f}"
    assert by_series[(TASK, "raw")]["confirmation score, whole run"] == f"{whole_raw:.4f}"
    assert by_series[(TASK, "avg")]["confirmation score, final 20%"] == f"{final_raw + 0.3:.4f}"
    assert header.index("confirmation score, final 20%") == header.index("score, final 20%") + 1
    assert header.index("confirmation score, whole run") == header.index("score, whole run") + 1
    # The CLI's text table too.
    assert "confirm., last" in format_summary(summarize(tmp_path))


# --------------------------------------------------------------------------------------------- drift

# previous drift per snapshot (the first has none) and the window's model count, window 3.
PREVIOUS = [None, 0.5, 0.02, 0.03, 0.02, 0.025, 0.2, 0.02, 0.03, 0.02, 0.02]
AVERAGE = [0.0, 0.3, 0.3, 0.02, 0.03, 0.03, 0.12, 0.1, 0.03, 0.025, 0.02]


def drift_run(root: Path) -> list[int]:
    history = small_run(root, steps=len(PREVIOUS))
    steps = [100 * (k + 1) for k in range(len(PREVIOUS))]
    for k, step in enumerate(steps):
        history.append_drift(
            step,
            previous_step=steps[k - 1] if k else None,
            previous=PREVIOUS[k],
            average=AVERAGE[k],
            n_models=min(k + 1, 3),
        )
    return steps


def test_the_jump_note_names_the_steps_a_hand_median_makes_jumps(tmp_path):
    drift_run(tmp_path)
    text = write_report(tmp_path).read_text()
    part = section(text, "Weight drift")
    # By hand: the 10 previous values sorted are 0.02 x5, 0.025, 0.03 x2, 0.2, 0.5; median (0.02 + 0.025)
    # / 2 = 0.0225, threshold 3 x that = 0.0675: snapshots 2 (0.5) and 7 (0.2), steps 200 and 700.
    assert "Median `previous` drift: 0.0225 over 10 snapshots, so a jump is above 0.0675." in part
    assert "- **Jumps** (2): step 200 (0.5, 22.2× the median), step 700 (0.2, 8.9× the median)." in part
    # Windows of 3 (2 at step 200): a window spans a jump when one of its snapshots other than the oldest
    # is one: 200 (100, 200), 300 (100-300); 400 (200-400) holds 200 as its oldest: no. Then 700, 800.
    assert "- **Windows that span a jump** (by the step they end at): 200–300, 700–800." in part
    assert "3 × the run's median `previous`" in part and "at least 5 values" in part
    assert "warm-up" in part and "mixes models far apart" in part
    assert "![Weight drift over training](weight-drift.png)" in part
    assert (tmp_path / "report" / "weight-drift.png").stat().st_size > 10_000


def test_too_few_drift_values_call_no_jump(tmp_path):
    history = small_run(tmp_path)
    for k, previous in enumerate([None, 0.5, 0.01, 0.01, 0.01]):  # 4 values: too few for a median
        history.append_drift(100 * (k + 1), previous_step=None, previous=previous, average=0.01, n_models=1)
    part = section(write_report(tmp_path).read_text(), "Weight drift")
    assert "Only 4 snapshot(s) have a `previous` drift" in part and "**Jumps**" not in part


# --------------------------------------------------------------------------- recommended window: ensemble

# Per-example correctness over 10 raw evaluations (1 = right), four kinds of example. Only the final 2
# evaluations (ceil(0.2 x 10) = 2) enter MTV, so each kind's change of vote between evaluations 9 and 10
# is worked out by hand for n = 1, 2, 5, 10 (ties between right and wrong go to the newest snapshot):
#   X (right, then wrong at 10):           raw -1, n=2 -1 (tie, newest), n=5  0, n=10 0
#   Y (wrong, then right at 10):           raw +1, n=2 +1,               n=5  0, n=10 0
#   U (1,1,1,1,0,1,1,0,0,1):               raw +1, n=2 +1, n=5 +1 (2 of 5 -> 3 of 5), n=10 0
#   V (0,0,0,0,0,1,1,1,1,1):               raw  0, n=2  0, n=5  0, n=10 +1 (4 of 9 -> 5 of 10, tie, newest)
KINDS = {
    "X": [1] * 9 + [0],
    "Y": [0] * 9 + [1],
    "U": [1, 1, 1, 1, 0, 1, 1, 0, 0, 1],
    "V": [0] * 5 + [1] * 5,
}
COUNTS = {"X": 10, "Y": 12, "U": 21, "V": 20}  # 63 examples
# So MTV x 63 = |-10 + 12 + 21| = 23 for n = 1 and 2, 21 for n = 5, 20 for n = 10 (the lowest): the bound
# is 1.1 x 20 = 22, which n = 1 and 2 exceed, and the smallest window within it is n = 5, not n = 10.


def ensemble_run(root: Path, evidence: dict | None) -> list[list[int]]:
    patterns = [KINDS[kind] for kind, count in COUNTS.items() for _ in range(count)]
    history = new_run(root, len(patterns))
    for k in range(10):
        evaluate(history, 100 * (k + 1), "raw", 1, [p[k] for p in patterns])
    history.append_drift(100, previous_step=None, previous=None, average=0.0, n_models=1)
    if evidence is not None:
        write_best(root, 1000, evidence)
    return patterns


def hand_vote(window: list[int]) -> int:
    """Majority of 0/1 correctness values; a tie goes to the newest (the last)."""
    counts = Counter(window)
    top = max(counts.values())
    return next(v for v in reversed(window) if counts[v] == top)


def hand_ensemble_rows(patterns: list[list[int]], examples: list[int]) -> dict[int, dict]:
    rows = {}
    final = [8, 9]  # 0-based: evaluations 9 and 10
    raw = np.array([[p[e] for e in final] for p in patterns], dtype=np.float64)
    for n in (1, 2, 5, 10):
        votes = np.array(
            [[hand_vote(p[max(0, e - n + 1) : e + 1]) for e in final] for p in patterns], dtype=np.float64
        )
        scores = votes.mean(axis=0)
        mtv = abs(scores[1] - scores[0])
        difference = paired_difference(votes.mean(axis=1)[examples], raw.mean(axis=1)[examples])
        rows[n] = {"mtv": mtv, "score": scores.mean(), "difference": difference}
    return rows


def hand_rule(rows: dict[int, dict]) -> tuple[int | None, dict[int, str]]:
    lowest = min(row["mtv"] for row in rows.values())
    excluded, eligible = {}, []
    for n in sorted(rows):
        if rows[n]["mtv"] > 1.1 * lowest:
            excluded[n] = "MTV"
        elif rows[n]["difference"] is not None and rows[n]["difference"].high < 0:
            excluded[n] = "significance"
        else:
            eligible.append(n)
    return (eligible[0] if eligible else None), excluded


def signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def recommendation_table(text: str, title: str) -> tuple[dict[int, list[str]], str]:
    part = text.split(f"### Task {TASK}: {title}\n", 1)[1].split("\n#", 1)[0]
    rows = {int(row[0]): row[1:] for row in table_rows(part)[1:]}
    return rows, part


def test_the_ensemble_recommendation_applies_the_rule_to_hand_counted_votes(tmp_path):
    patterns = ensemble_run(tmp_path, dict(EVIDENCE, as_of=1000, chosen=dict(EVIDENCE["chosen"], step=1000)))
    # The confirmation half of holdout=0.5, from the hash itself.
    examples = [i for i in range(len(patterns)) if is_confirmation(TASK, i, 0.5)]
    assert 20 < len(examples) < 43
    hand = hand_ensemble_rows(patterns, examples)
    assert [round(hand[n]["mtv"] * 63) for n in (1, 2, 5, 10)] == [23, 23, 21, 20]  # as designed above
    chosen, excluded = hand_rule(hand)
    assert chosen == 5 and excluded == {1: "MTV", 2: "MTV"}

    text = write_report(tmp_path).read_text()
    rows, part = recommendation_table(text, "ensemble (vote of the last n raw outputs)")
    assert sorted(rows) == [1, 2, 5, 10]
    for n, row in rows.items():
        difference = hand[n]["difference"]
        assert row[0] == f"{hand[n]['mtv']:.4f}" and row[1] == f"{hand[n]['score']:.4f}"
        assert (
            row[2] == f"{signed(difference.estimate)} [{signed(difference.low)}, {signed(difference.high)}]"
        )
    assert rows[5][3] == "**recommended**" and rows[10][3] == "eligible"
    bound = 1.1 * hand[10]["mtv"]
    assert rows[1][3] == f"excluded: MTV {hand[1]['mtv']:.4g} > {bound:.4g}"
    lowest = f"{hand[10]['mtv']:.4g}"
    assert (
        f"**Recommended: n = 5.** Rule: the smallest window whose MTV is at most (1 + 0.1) × {lowest}" in part
    )
    assert "over the confirmation half (`holdout=0.5`)" in section(text, "Recommended window")

    # The rows themselves: the intervals are paired_difference's, exactly, on the hand means.
    computed = {
        row["n"]: row
        for row in ensemble_window_rows(History(tmp_path, read_only=True), TASK, examples=examples)
    }
    for n in (1, 2, 5, 10):
        assert computed[n]["confirmation_diff"] == hand[n]["difference"].to_json()
        assert computed[n]["mtv"] == pytest.approx(hand[n]["mtv"], abs=1e-12)


def test_without_a_known_holdout_the_differences_run_over_all_examples(tmp_path):
    patterns = ensemble_run(tmp_path, None)  # no best.json: no holdout size, though drift is recorded
    hand = hand_ensemble_rows(patterns, list(range(len(patterns))))
    text = write_report(tmp_path).read_text()
    rows, _ = recommendation_table(text, "ensemble (vote of the last n raw outputs)")
    for n, row in rows.items():
        difference = hand[n]["difference"]
        assert (
            row[2] == f"{signed(difference.estimate)} [{signed(difference.low)}, {signed(difference.high)}]"
        )
    assert "over all examples (the run had no holdout)" in section(text, "Recommended window")


def test_records_with_confirmation_scores_but_no_evidence_say_the_half_is_unknown(tmp_path):
    small_run(tmp_path)  # holdout fields in the records, no best.json
    part = section(write_report(tmp_path).read_text(), "Recommended window")
    assert "records no holdout size" in part and "over all examples" in part


# ---------------------------------------------------------------------------- recommended window: average

# analyze-style: raw and avg at windows 2, 4, 8, 16 at 25 steps of 40 examples; final 20% = 5 steps.
# Correct examples at those steps (the first k of 40), chosen for their MTV (in changes of k / 160):
FINAL_K = {
    1: [10, 30, 8, 32, 12],  # 86: excluded
    2: [20, 30, 20, 30, 20],  # 40: excluded
    4: [20, 25, 20, 25, 19],  # 21, within 1.1 x 20 and better than raw: recommended
    8: [20, 25, 20, 25, 20],  # 20, the lowest: eligible
    16: [2, 7, 2, 7, 2],  # 20, the lowest too, but far below raw: excluded as significantly worse
}
N_AVG = 40


def average_run(root: Path) -> None:
    history = new_run(root, N_AVG)
    for t in range(25):
        step = 10 * (t + 1)
        for n, ks in FINAL_K.items():
            k = ks[t - 20] if t >= 20 else 20
            evaluate(history, step, "raw" if n == 1 else "avg", n, [int(i < k) for i in range(N_AVG)])
    write_best(root, 250, dict(EVIDENCE, as_of=250, chosen=dict(EVIDENCE["chosen"], step=250)))


def test_the_average_recommendation_uses_the_windows_the_history_holds(tmp_path):
    average_run(tmp_path)
    examples = [i for i in range(N_AVG) if is_confirmation(TASK, i, 0.5)]
    correct = {n: np.array([[float(i < k) for i in range(N_AVG)] for k in ks]) for n, ks in FINAL_K.items()}
    hand = {}
    for n, values in correct.items():
        scores = values.mean(axis=1)
        mtv = np.abs(np.diff(scores)).sum() / 4
        difference = paired_difference(values.mean(axis=0)[examples], correct[1].mean(axis=0)[examples])
        hand[n] = {"mtv": mtv, "score": scores.mean(), "difference": difference}
    assert [round(hand[n]["mtv"] * 160) for n in (1, 2, 4, 8, 16)] == [86, 40, 21, 20, 20]
    chosen, excluded = hand_rule(hand)
    assert chosen == 4 and excluded == {1: "MTV", 2: "MTV", 16: "significance"}

    text = write_report(tmp_path).read_text()
    rows, part = recommendation_table(text, "average (the weights of the last n snapshots)")
    assert sorted(rows) == [1, 2, 4, 8, 16]
    for n, row in rows.items():
        difference = hand[n]["difference"]
        assert row[:2] == [f"{hand[n]['mtv']:.4f}", f"{hand[n]['score']:.4f}"]
        assert (
            row[2] == f"{signed(difference.estimate)} [{signed(difference.low)}, {signed(difference.high)}]"
        )
    assert rows[4][3] == "**recommended**" and rows[8][3] == "eligible"
    assert rows[16][3].startswith("excluded: confirmation difference significantly below 0")
    assert "**Recommended: n = 4.**" in part
    computed = average_window_rows(History(tmp_path, read_only=True), TASK, examples=examples)
    assert {row["n"]: row["confirmation_diff"] for row in computed} == {
        n: hand[n]["difference"].to_json() for n in FINAL_K
    }


# -------------------------------------------------------------------------------------------- old runs


def test_an_old_format_run_gets_none_of_the_new_sections(tmp_path):
    small_run(tmp_path, holdout_fields=False)
    write_best(tmp_path, 500)  # no evidence, no drift.jsonl, no holdout fields
    text = write_report(tmp_path).read_text()
    assert headings(text) == [
        "Best model",
        "Stability: final 20% of evaluations and whole run",
        "Scores over training",
        "Which examples flip",
        "Ensemble window size",
    ]
    assert "confirmation" not in text and "drift" not in text.lower()
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "flips-qa.png",
        "report.md",
        "scores-qa.png",
        "window-sweep.png",
    ]
    assert all(row.get("confirmation_last") is None for row in summarize(tmp_path))
    assert "confirm." not in format_summary(summarize(tmp_path))
    assert not math.isnan(summarize(tmp_path)[0]["mtv"])


def test_a_run_without_scores_still_shows_how_its_weights_moved(tmp_path):
    history = History(tmp_path)  # tasks=[]: buffer, average and export only, no score line
    (tmp_path / "history.jsonl").touch()
    for k, previous in enumerate(PREVIOUS):
        history.append_drift(100 * (k + 1), previous_step=None, previous=previous, average=0.01, n_models=1)
    text = write_report(tmp_path).read_text()
    assert "**No evaluation records yet.**" in text
    part = section(text, "Weight drift")
    # Windows of one snapshot never span a jump: the jumps are named, no window is.
    assert "- **Jumps** (2): step 200" in part and "No window spans a jump" in part


def test_evidence_of_another_step_than_the_pointer_says_so(tmp_path):
    small_run(tmp_path)
    write_best(tmp_path, 400, EVIDENCE)  # the evidence's chosen model is step 500
    part = section(write_report(tmp_path).read_text(), "Does the choice hold up?")
    assert "The evidence describes step 500, avg, while `best.json` points at step 400, avg" in part
