"""Property-based tests (hypothesis): the metrics and ensemble combiners against independent
formulas, and the snapshot buffer as a state machine against a list of steps."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from safetensors import safe_open

from checkpoint_stability.buffer import SnapshotBuffer
from checkpoint_stability.ensemble import mean_prob, vote
from checkpoint_stability.metrics import char_f1, instability_score, mean_total_variation

scores = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=40)


def output_matrices():
    """(checkpoints x examples) matrices of outputs in 0..3: 2-8 checkpoints, 1-12 examples."""
    values = st.integers(0, 3)
    return st.integers(2, 8).flatmap(
        lambda m: st.integers(1, 12).flatmap(
            lambda n: st.lists(st.lists(values, min_size=n, max_size=n), min_size=m, max_size=m)
        )
    )


# ------------------------------------------------------------------------------------------------ MTV


@given(scores)
def test_mtv_is_the_mean_absolute_step(values):
    steps = np.abs(np.diff(np.asarray(values, dtype=np.float64)))
    assert math.isclose(mean_total_variation(values), steps.sum() / len(steps), rel_tol=1e-12, abs_tol=1e-9)


@given(scores, st.floats(-1e3, 1e3, allow_nan=False), st.floats(-10, 10, allow_nan=False))
def test_mtv_ignores_shifts_scales_with_the_series_and_reads_the_same_backwards(values, shift, scale):
    base = mean_total_variation(values)
    assert mean_total_variation(values[::-1]) == base
    assert math.isclose(mean_total_variation([v + shift for v in values]), base, rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(
        mean_total_variation([v * scale for v in values]), abs(scale) * base, rel_tol=1e-9, abs_tol=1e-6
    )
    # The path is at least as long as the distance it covers.
    assert base * (len(values) - 1) >= abs(values[-1] - values[0]) - 1e-6


# ------------------------------------------------------------------------------------------------- IS


@given(output_matrices())
def test_is_counts_changes_between_adjacent_checkpoints(rows):
    matrix = np.asarray(rows)
    changes = (matrix[1:] != matrix[:-1]).mean()  # mean over (pairs x examples): the same average
    assert math.isclose(instability_score(rows), float(changes), rel_tol=1e-12, abs_tol=1e-12)


@given(output_matrices(), st.randoms(use_true_random=False))
def test_is_is_in_unit_range_zero_iff_steady_and_ignores_example_order_and_time_direction(rows, rng):
    value = instability_score(rows)
    assert 0.0 <= value <= 1.0
    steady = all(len({row[i] for row in rows}) == 1 for i in range(len(rows[0])))
    assert (value == 0.0) == steady
    order = list(range(len(rows[0])))
    rng.shuffle(order)
    assert math.isclose(instability_score([[row[i] for i in order] for row in rows]), value, abs_tol=1e-12)
    assert math.isclose(instability_score(rows[::-1]), value, abs_tol=1e-12)


@given(st.text(max_size=30), st.text(max_size=30))
def test_char_f1_is_symmetric_bounded_and_one_for_equal_strings(a, b):
    assert char_f1(a, b) == char_f1(b, a)
    assert 0.0 <= char_f1(a, b) <= 1.0
    assert char_f1(a, a) == 1.0
    assert char_f1(a, " ".join(a)) == 1.0  # whitespace is ignored


# ------------------------------------------------------------------------------------------- ensembles


@given(output_matrices())
def test_vote_picks_a_most_frequent_output_and_breaks_ties_by_the_newest_snapshot(rows):
    combined = vote(rows)
    for i, chosen in enumerate(combined):
        column = [row[i] for row in rows]
        counts = {value: column.count(value) for value in column}
        top = max(counts.values())
        assert counts[chosen] == top
        tied = {value for value, count in counts.items() if count == top}
        newest_tied = next(value for value in reversed(column) if value in tied)
        assert chosen == newest_tied


@given(output_matrices(), st.randoms(use_true_random=False))
def test_vote_is_unanimous_when_the_window_agrees_and_follows_a_reordering_of_examples(rows, rng):
    assert vote([rows[0]] * len(rows)) == rows[0]
    order = list(range(len(rows[0])))
    rng.shuffle(order)
    combined = vote(rows)
    assert vote([[row[i] for i in order] for row in rows]) == [combined[i] for i in order]


logprob_windows = st.integers(1, 6).flatmap(
    lambda m: st.integers(1, 8).flatmap(
        lambda n: st.lists(st.integers(2, 5), min_size=n, max_size=n).flatmap(
            lambda choices: st.lists(
                st.tuples(*[st.lists(st.floats(-20, 0), min_size=c, max_size=c) for c in choices]),
                min_size=m,
                max_size=m,
            )
        )
    )
)


@given(logprob_windows)
def test_mean_prob_is_the_argmax_of_the_mean_softmax(window):
    window = [list(map(list, snapshot)) for snapshot in window]
    combined = mean_prob(window)
    for i, chosen in enumerate(combined):
        probabilities = []
        for snapshot in window:
            row = np.asarray(snapshot[i], dtype=np.float64)
            exp = np.exp(row - row.max())
            probabilities.append(exp / exp.sum())
        mean = np.mean(probabilities, axis=0)
        ordered = np.sort(mean)[::-1]
        assume(len(ordered) < 2 or ordered[0] - ordered[1] > 1e-9)  # a float near-tie could go either way
        assert chosen == int(np.argmax(mean))


@given(logprob_windows, st.floats(-50, 50))
def test_mean_prob_ignores_a_constant_added_to_a_snapshots_log_probs(window, shift):
    window = [list(map(list, snapshot)) for snapshot in window]
    shifted = [[[v + shift for v in row] for row in snapshot] for snapshot in window]
    for i in range(len(window[0])):
        mean = np.mean(
            [np.exp(np.asarray(s[i]) - np.logaddexp.reduce(np.asarray(s[i]))) for s in window], axis=0
        )
        ordered = np.sort(mean)[::-1]
        assume(len(ordered) < 2 or ordered[0] - ordered[1] > 1e-9)
    assert mean_prob(shifted) == mean_prob(window)


# ------------------------------------------------------------------------------ the buffer as a machine


class BufferMachine(RuleBasedStateMachine):
    """Push, wait, reopen and truncate a SnapshotBuffer; it must always hold the last ``window`` steps
    pushed (and not truncated), and its files, manifest and contents must agree with that."""

    @initialize(window=st.integers(1, 4))
    def start(self, window):
        self.root = Path(tempfile.mkdtemp(prefix="buffer-machine-"))
        self.window = window
        self.buffer = SnapshotBuffer(self.root, window=window)
        self.steps: list[int] = []  # the model: every step pushed and still alive, oldest first
        self.next_step = 1

    @rule(gap=st.integers(1, 3))
    def push(self, gap):
        step = self.next_step + gap - 1
        self.next_step = step + 1
        self.buffer.push(step, {"w": torch.full((3,), float(step)), "n": torch.tensor([step])})
        self.steps.append(step)

    @rule()
    def reopen(self):
        self.buffer.close()
        self.buffer = SnapshotBuffer(self.root, window=self.window)

    @precondition(lambda self: self.steps)
    @rule(data=st.data())
    def truncate(self, data):
        self.buffer.wait()
        kept = self.steps[-self.window :]
        cut = data.draw(st.integers(min(kept) - 1, max(kept)))
        self.buffer.truncate_after(cut)
        self.steps = [s for s in self.steps if s <= cut]
        # Steps truncated away leave the window short: what was evicted before is gone for good.
        self.steps = [s for s in self.steps if s in kept]
        self.next_step = max(self.next_step, cut + 1)

    @invariant()
    def holds_the_last_window(self):
        self.buffer.wait()
        expected = self.steps[-self.window :]
        assert self.buffer.steps == expected
        files = sorted(p.name for p in self.root.glob("step-*.safetensors"))
        assert files == sorted(f"step-{s:08d}.safetensors" for s in expected)
        manifest = json.loads((self.root / "manifest.json").read_text()) if expected else {"snapshots": []}
        assert [entry["step"] for entry in manifest["snapshots"]] == expected
        for step in expected:
            with safe_open(str(self.root / f"step-{step:08d}.safetensors"), framework="pt") as handle:
                assert handle.get_tensor("w").tolist() == [float(step)] * 3

    def teardown(self):
        self.buffer.close()
        shutil.rmtree(self.root, ignore_errors=True)


BufferMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_buffer_state_machine = BufferMachine.TestCase
