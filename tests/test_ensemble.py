import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_stability import ensemble
from checkpoint_stability.ensemble import ENSEMBLE_METHODS, combine, mean_prob, vote

# Small example counts keep both files well under the 5 s budget; the oracle tests get more.
FAST = settings(max_examples=50, deadline=None)
THOROUGH = settings(max_examples=150, deadline=None)
NEG_INF = -math.inf
log = math.log

# Multiples of 1/4 are exact in binary, so any two different orders of summation agree exactly and
# distinct values are far apart after a softmax: oracles below can compare ties with ==.
grid_logprobs = st.integers(-40, 0).map(lambda k: k / 4)


def test_docstring_examples_run():
    result = doctest.testmod(ensemble)
    assert result.attempted > 0
    assert result.failed == 0


def test_ensemble_methods():
    assert ENSEMBLE_METHODS == ("vote", "mean_prob")


# ---------------------------------------------------------------- vote: hand-counted


def test_vote_majority_hand_counted():
    outputs = [  # oldest snapshot first
        [0, "a", 7],
        [1, "b", 7],
        [1, "a", 8],
        [2, "a", 9],
        [1, "c", 9],
    ]
    # example 0: 0:1, 1:3, 2:1 -> 1
    # example 1: a:3, b:1, c:1 -> "a"
    # example 2: 7:2, 8:1, 9:2 -> tie {7, 9}; newest snapshot (4) said 9 -> 9
    assert vote(outputs) == [1, "a", 9]


def test_vote_tie_broken_by_logprob_sum_over_all_snapshots():
    outputs = [[0], [1], [0], [1]]  # 2-2 tie; the newest snapshot said 1
    choice_logprobs = [
        [[-0.5, -3.0, -0.01]],
        [[-0.1, -0.2, -0.01]],
        [[-0.5, -3.0, -0.01]],
        [[-0.1, -0.2, -0.01]],
    ]
    # sum over all 4 snapshots: choice 0 = -0.5-0.1-0.5-0.1 = -1.2, choice 1 = -3.0-0.2-3.0-0.2 = -6.4 -> 0.
    # (summing only each choice's own voters would give -1.0 vs -0.4 -> 1, and "newest" would give 1;
    # choice 2 has the best sum, -0.04, but got no votes so it is not a candidate.)
    assert vote(outputs, choice_logprobs) == [0]


def test_vote_logprob_tie_break_only_among_most_voted():
    outputs = [[2], [0], [0], [1], [1]]  # 0 and 1 have two votes each, 2 has one
    choice_logprobs = [[[-2.0, -1.0, 0.0]]] * 5
    # sums: 0 -> -10, 1 -> -5, 2 -> 0 (best, but not tied for most votes) -> 1
    assert vote(outputs, choice_logprobs) == [1]


def test_vote_tied_logprob_sums_fall_back_to_newest():
    outputs = [[0], [1], [0], [1]]  # 2-2 tie; newest said 1, oldest and lowest index is 0
    choice_logprobs = [
        [[-0.25, -0.75]],
        [[-0.75, -0.25]],
        [[-0.5, -0.5]],
        [[-0.5, -0.5]],
    ]
    # sums: 0 -> -0.25-0.75-0.5-0.5 = -2.0, 1 -> -0.75-0.25-0.5-0.5 = -2.0: exact tie -> newest -> 1
    assert vote(outputs, choice_logprobs) == [1]
    # the same with the newest vote flipped: now newest said 0
    assert vote([[1], [0], [1], [0]], choice_logprobs) == [0]


def test_vote_without_logprobs_newest_tied_output_wins():
    assert vote([["a"], ["b"], ["b"], ["a"]]) == ["a"]  # a:2, b:2 -> newest "a"
    assert vote([["a"], ["b"], ["a"], ["b"]]) == ["b"]  # a:2, b:2 -> newest "b"
    assert vote([[2], [0], [1]]) == [1]  # three-way tie -> newest
    # a:2, b:2, c:1: the newest snapshot said "c" (not tied), the next newest said "b" -> "b"
    assert vote([["a"], ["a"], ["b"], ["b"], ["c"]]) == ["b"]


def test_vote_with_neg_inf_logprobs():
    outputs = [[0, 0], [1, 1]]  # 1-1 ties in both examples, newest said 1
    choice_logprobs = [
        [[-1.0, NEG_INF], [NEG_INF, 0.0]],
        [[-2.0, -0.5], [0.0, NEG_INF]],
    ]
    # example 0: sums -3.0 vs -inf -> 0
    # example 1: sums -inf vs -inf (tie) -> newest -> 1
    assert vote(outputs, choice_logprobs) == [0, 1]


def test_vote_generation_outputs_and_token_ids():
    outputs = [["Paris", 17, None], ["Lyon", 17, "x"], ["Paris", 3, None]]
    assert vote(outputs) == ["Paris", 17, None]


def test_vote_window_of_one_and_zero_examples():
    assert vote([[3, "x"]]) == [3, "x"]
    assert vote([[3, 1]], [[[0.0, 0.0, 0.0, -1.0], [-1.0, -2.0]]]) == [3, 1]
    assert vote([[], []]) == []


def test_vote_accepts_numpy():
    outputs = np.array([[0, 1], [1, 1], [1, 0]])
    logprobs = np.log(np.full((3, 2, 2), 0.5))
    assert vote(outputs, logprobs) == [1, 1]


# ---------------------------------------------------------------- vote: properties


N_CHOICES = 3
# -inf often enough to exercise -inf sums and ties between them.
grid_or_neg_inf = st.integers(-9, 0).map(lambda k: NEG_INF if k == -9 else k / 2)


def _reshape(flat, s, n, k=None):
    if k is None:
        return [flat[t * n : (t + 1) * n] for t in range(s)]
    return [[flat[(t * n + i) * k : (t * n + i + 1) * k] for i in range(n)] for t in range(s)]


@st.composite
def windows(draw, max_snapshots=6, max_examples=2):
    # Flat draws reshaped afterwards: nested list strategies are several times slower to generate.
    s = draw(st.integers(1, max_snapshots))
    n = draw(st.integers(1, max_examples))
    outputs = draw(st.lists(st.integers(0, N_CHOICES - 1), min_size=s * n, max_size=s * n))
    logprobs = draw(st.lists(grid_or_neg_inf, min_size=s * n * N_CHOICES, max_size=s * n * N_CHOICES))
    return _reshape(outputs, s, n), _reshape(logprobs, s, n, N_CHOICES)


@FAST
@given(st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=8))
def test_vote_window_of_one_returns_that_snapshot(row):
    assert vote([row]) == row


@FAST
@given(windows(), st.booleans())
def test_vote_result_is_one_of_the_column_outputs(window, use_logprobs):
    outputs, logprobs = window
    result = vote(outputs, logprobs if use_logprobs else None)
    assert len(result) == len(outputs[0])
    for i, chosen in enumerate(result):
        assert chosen in [snapshot[i] for snapshot in outputs]


@THOROUGH
@given(st.data())
def test_vote_strict_majority_wins_regardless_of_logprobs(data):
    s = data.draw(st.integers(1, 7))
    majority = data.draw(st.integers(0, N_CHOICES - 1))
    k = data.draw(st.integers(s // 2 + 1, s))  # k > s/2 votes for the majority
    # Other votes drawn from the remaining choices: skip over the majority value.
    others = data.draw(st.lists(st.integers(0, N_CHOICES - 2), min_size=s - k, max_size=s - k))
    others = [c if c < majority else c + 1 for c in others]
    column = data.draw(st.permutations([majority] * k + others))
    outputs = [[c] for c in column]
    logprobs = _reshape(
        data.draw(st.lists(grid_or_neg_inf, min_size=s * N_CHOICES, max_size=s * N_CHOICES)), s, 1, N_CHOICES
    )
    assert vote(outputs) == [majority]
    assert vote(outputs, logprobs) == [majority]


def _rank_oracle(column, logprobs_column):
    # Independent formulation of the rules: rank each candidate by (votes, logprob sum, newest position).
    def rank(c):
        total = sum(vector[c] for vector in logprobs_column) if logprobs_column is not None else 0.0
        newest = max(t for t, o in enumerate(column) if o == c)
        return (column.count(c), total, newest)

    return max(set(column), key=rank)


@THOROUGH
@given(windows())
def test_vote_matches_lexicographic_oracle(window):
    outputs, logprobs = window
    n = len(outputs[0])
    expected = [_rank_oracle([o[i] for o in outputs], [lp[i] for lp in logprobs]) for i in range(n)]
    assert vote(outputs, logprobs) == expected


@FAST
@given(windows())
def test_vote_without_logprobs_matches_oracle(window):
    outputs, _ = window
    n = len(outputs[0])
    assert vote(outputs) == [_rank_oracle([o[i] for o in outputs], None) for i in range(n)]


# ---------------------------------------------------------------- vote: errors


@pytest.mark.parametrize(
    ("outputs", "choice_logprobs", "pattern"),
    [
        ([], None, r"outputs is an empty window \(zero snapshots\)"),
        ([[1, 2], [1, 2], [1]], None, r"outputs is ragged: snapshot 2 has 1 examples, expected 2"),
        ([[1], 3], None, r"outputs\[1\] must be a sequence, got int"),
        (["ab", "ab"], None, r"outputs\[0\] must be a sequence, got str"),
        ("ab", None, r"outputs must be a sequence, got str"),
        ([[[1]], [[1]]], None, r"outputs\[0\]\[0\] is an unhashable list"),
        ([[0], [0]], [[[0.0, 0.0]]], r"choice_logprobs has 1 snapshots but outputs has 2"),
        ([[0], [0]], [[[0.0]], [[0.0]], [[0.0]]], r"choice_logprobs has 3 snapshots but outputs has 2"),
        (
            [[0], [0]],
            [[[0.0], [0.0]], [[0.0], [0.0]]],
            r"choice_logprobs has 2 examples per snapshot but outputs has 1",
        ),
        ([[0], [2]], [[[0.0, 0.0]], [[0.0, 0.0]]], r"outputs\[1\]\[0\] is 2.*choice indices in 0\.\.1"),
        ([[0], [-1]], [[[0.0, 0.0]], [[0.0, 0.0]]], r"outputs\[1\]\[0\] is -1.*choice indices"),
        ([["a"], ["b"]], [[[0.0, 0.0]], [[0.0, 0.0]]], r"outputs\[0\]\[0\] is 'a'.*choice indices"),
        ([[True], [0]], [[[0.0, 0.0]], [[0.0, 0.0]]], r"outputs\[0\]\[0\] is True.*choice indices"),
        (
            [[0], [1]],
            [[[0.0, 0.0]], [[0.0, 0.0, 0.0]]],
            r"disagree on the number of choices of example 0: snapshot 1 has 3, snapshot 0 has 2",
        ),
        ([[0], [1]], [[[0.0, 0.0]], [[-1.0, math.nan]]], r"choice_logprobs\[1\]\[0\]\[1\] is NaN"),
        ([[0], [1]], [[[math.inf, 0.0]], [[0.0, 0.0]]], r"choice_logprobs\[0\]\[0\]\[0\] is \+inf"),
        (
            [[0], [1]],
            [[[0.0, 0.0]], [[0.0, "x"]]],
            r"choice_logprobs\[1\]\[0\]\[1\] is 'x' \(str\).*real number",
        ),
        ([[0], [1]], [[[0.0, False]], [[0.0, 0.0]]], r"choice_logprobs\[0\]\[0\]\[1\] is False \(bool\)"),
        ([[0], [1]], [[[]], [[]]], r"choice_logprobs\[0\]\[0\] has zero choices"),
        (
            [[0], [1]],
            [[[0.0, 0.0]], [[0.0, 0.0], [0.0]]],
            r"choice_logprobs is ragged: snapshot 1 has 2 examples, expected 1",
        ),
        ([[0], [1]], [], r"choice_logprobs is an empty window"),
    ],
)
def test_vote_rejects_bad_input(outputs, choice_logprobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        vote(outputs, choice_logprobs)


def test_vote_rejects_nan_logprob_even_without_a_tie():
    with pytest.raises(ValueError, match=r"choice_logprobs\[0\]\[0\]\[0\] is NaN"):
        vote([[0], [0]], [[[math.nan, 0.0]], [[0.0, 0.0]]])


# ---------------------------------------------------------------- mean_prob: hand-computed


def test_mean_prob_hand_computed_and_differs_from_vote():
    choice_logprobs = [
        [[log(0.40), log(0.35), log(0.25)]],
        [[log(0.40), log(0.35), log(0.25)]],
        [[log(0.05), log(0.90), log(0.05)]],
    ]
    # mean probabilities: choice 0 = (0.40+0.40+0.05)/3 = 0.2833, choice 1 = (0.35+0.35+0.90)/3 = 0.5333,
    # choice 2 = (0.25+0.25+0.05)/3 = 0.1833 -> 1, while a vote of the per-snapshot argmaxes gives 0.
    assert mean_prob(choice_logprobs) == [1]
    assert vote([[0], [0], [1]], choice_logprobs) == [0]


def test_mean_prob_normalises_each_snapshot():
    # Snapshot 0 is [0.9, 0.1] scaled by e^-5, snapshot 1 is [0.2, 0.8] scaled by e^5 (unnormalised).
    # Per-snapshot softmax: mean = [(0.9+0.2)/2, (0.1+0.8)/2] = [0.55, 0.45] -> 0.
    # (averaging the raw exponentials would be dominated by snapshot 1 and pick 1.)
    choice_logprobs = [
        [[log(0.9) - 5, log(0.1) - 5]],
        [[log(0.2) + 5, log(0.8) + 5]],
    ]
    assert mean_prob(choice_logprobs) == [0]


def test_mean_prob_is_numerically_stable():
    # softmax([1000, 999]) = [1/(1+e^-1), e^-1/(1+e^-1)] = [0.7311, 0.2689]
    # softmax([-1000.5, -1000]) = [1/(1+e^0.5), e^0.5/(1+e^0.5)] = [0.3775, 0.6225]
    # mean = [0.5543, 0.4457] -> 0
    assert mean_prob([[[1000.0, 999.0]], [[-1000.5, -1000.0]]]) == [0]
    # softmax([-1000, -999]) = [0.2689, 0.7311], softmax([1000, 1000]) = [0.5, 0.5]
    # -> mean [0.3845, 0.6155] -> 1
    assert mean_prob([[[-1000.0, -999.0]], [[1000.0, 1000.0]]]) == [1]


def test_mean_prob_matches_hand_softmax_values():
    # example 0: softmax([0, log 3]) = [1/4, 3/4] and softmax([log 2, log 3]) = [2/5, 3/5]:
    #            mean [0.325, 0.675] -> 1
    # example 1: softmax([log 3, 0, 0]) = [3/5, 1/5, 1/5] and softmax([0, 0, log 2]) = [1/4, 1/4, 1/2]:
    #            mean [0.425, 0.225, 0.35] -> 0
    choice_logprobs = [
        [[0.0, log(3)], [log(3), 0.0, 0.0]],
        [[log(2), log(3)], [0.0, 0.0, log(2)]],
    ]
    assert mean_prob(choice_logprobs) == [1, 0]


def test_mean_prob_ties_go_to_lowest_index():
    assert mean_prob([[[0.0, 0.0, -1.0]]]) == [0]
    assert mean_prob([[[-1.0, 0.0, 0.0]]]) == [1]
    # mirrored snapshots: mean [0.5, 0.5] exactly -> 0
    assert mean_prob([[[0.0, -1.0]], [[-1.0, 0.0]]]) == [0]
    assert mean_prob([[[0.0, -1.0, -7.0]], [[-1.0, 0.0, -7.0]]]) == [0]


def test_mean_prob_neg_inf_allowed_unless_everywhere():
    assert mean_prob([[[NEG_INF, -3.0]]]) == [1]
    # [0, 1] and [1, 0] -> mean [0.5, 0.5] -> lowest index 0
    assert mean_prob([[[NEG_INF, -3.0]], [[0.0, NEG_INF]]]) == [0]
    # example 0: [0, 1] and [0.5, 0.5] -> mean [0.25, 0.75] -> 1
    assert mean_prob([[[NEG_INF, -3.0]], [[-1.0, -1.0]]]) == [1]


def test_mean_prob_accepts_numpy_and_returns_ints():
    result = mean_prob(np.log(np.array([[[0.2, 0.8], [0.7, 0.3]], [[0.4, 0.6], [0.6, 0.4]]])))
    assert result == [1, 0]
    assert all(type(choice) is int for choice in result)


# ---------------------------------------------------------------- mean_prob: properties


@FAST
@given(st.lists(st.lists(grid_logprobs, min_size=1, max_size=5), min_size=1, max_size=3))
def test_mean_prob_single_snapshot_is_argmax_lowest_on_ties(rows):
    expected = [row.index(max(row)) for row in rows]
    assert mean_prob([rows]) == expected


@FAST
@given(st.data())
def test_mean_prob_matches_float64_recomputation(data):
    s = data.draw(st.integers(1, 4))
    shapes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    flat = data.draw(st.lists(st.floats(-50, 50), min_size=s * sum(shapes), max_size=s * sum(shapes)))
    values = iter(flat)
    choice_logprobs = [[[next(values) for _ in range(k)] for k in shapes] for _ in range(s)]
    result = mean_prob(choice_logprobs)
    for i, k in enumerate(shapes):
        x = np.array([snapshot[i] for snapshot in choice_logprobs], dtype=np.float64)
        probs = np.exp(x - x.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        means = probs.mean(axis=0)
        assert 0 <= result[i] < k
        assert means[result[i]] == pytest.approx(means.max(), abs=1e-12)


# ---------------------------------------------------------------- mean_prob: errors


@pytest.mark.parametrize(
    ("choice_logprobs", "pattern"),
    [
        ([], r"choice_logprobs is an empty window \(zero snapshots\)"),
        ([[[0.0]], [[0.0], [0.0]]], r"choice_logprobs is ragged: snapshot 1 has 2 examples, expected 1"),
        (
            [[[0.0, 0.0]], [[0.0]]],
            r"disagree on the number of choices of example 0: snapshot 1 has 1, snapshot 0 has 2",
        ),
        ([[[0.0, 0.0], [0.0]], [[0.0, 0.0], [0.0, 0.0]]], r"example 1: snapshot 1 has 2, snapshot 0 has 1"),
        (
            [[[0.0, 0.0]], [[NEG_INF, NEG_INF]]],
            r"choice_logprobs\[1\]\[0\] is -inf for every choice: snapshot 1.*example 0",
        ),
        ([[[0.0], [NEG_INF]]], r"choice_logprobs\[0\]\[1\] is -inf for every choice: snapshot 0.*example 1"),
        ([[[0.0, math.nan]]], r"choice_logprobs\[0\]\[0\]\[1\] is NaN"),
        ([[[0.0, math.inf]]], r"choice_logprobs\[0\]\[0\]\[1\] is \+inf"),
        ([[[]]], r"choice_logprobs\[0\]\[0\] has zero choices"),
        ([[0.0]], r"choice_logprobs\[0\]\[0\] must be a sequence, got float"),
    ],
)
def test_mean_prob_rejects_bad_input(choice_logprobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        mean_prob(choice_logprobs)


# ---------------------------------------------------------------- combine


def test_combine_dispatches():
    outputs = [[0, 1], [1, 1], [1, 0]]
    logprobs = [[[-0.1, -2.0], [-3.0, -0.1]], [[-2.0, -0.1], [-3.0, -0.1]], [[-1.0, -0.5], [-0.1, -3.0]]]
    assert combine("vote", outputs) == vote(outputs) == [1, 1]
    assert combine("vote", outputs, logprobs) == vote(outputs, logprobs)
    assert combine("mean_prob", outputs, logprobs) == mean_prob(logprobs)
    assert combine("mean_prob", None, logprobs) == mean_prob(logprobs)


@pytest.mark.parametrize(
    ("method", "outputs", "choice_logprobs", "pattern"),
    [
        (
            "mean_prob",
            [[0]],
            None,
            r"'mean_prob' needs choice log-probabilities \(multiple-choice tasks only\).*ensemble='vote'",
        ),
        ("avg", [[0]], None, r"unknown ensemble method 'avg'; allowed: 'vote', 'mean_prob'"),
        (None, [[0]], None, r"unknown ensemble method None; allowed: 'vote', 'mean_prob'"),
        ("vote", None, None, r"'vote' needs outputs, got None"),
        ("mean_prob", [[0], [0]], [[[0.0, 0.0]]], r"choice_logprobs has 1 snapshots but outputs has 2"),
        (
            "mean_prob",
            [[0, 0]],
            [[[0.0, 0.0]]],
            r"choice_logprobs has 1 examples per snapshot but outputs has 2",
        ),
        ("mean_prob", [[5]], [[[0.0, 0.0]]], r"outputs\[0\]\[0\] is 5.*choice indices in 0\.\.1"),
        ("vote", [], None, r"outputs is an empty window"),
    ],
)
def test_combine_rejects_bad_input(method, outputs, choice_logprobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        combine(method, outputs, choice_logprobs)
