import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_stability import metrics
from checkpoint_stability.metrics import (
    SIMILARITIES,
    char_f1,
    exact_match,
    instability_score,
    mean_total_variation,
    resolve_similarity,
)

# Small example counts keep both files well under the 5 s budget; the oracle tests get more.
FAST = settings(max_examples=50, deadline=None)
THOROUGH = settings(max_examples=150, deadline=None)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
score_lists = st.lists(finite, min_size=2, max_size=10)
# Few distinct values so that neighbouring checkpoints often agree and often differ.
small_ints = st.integers(0, 2)
short_texts = st.text(alphabet="ab c", max_size=4)


@st.composite
def matrices(draw, values, max_rows=5, max_cols=4):
    # One flat draw reshaped afterwards: nested list strategies are several times slower to generate.
    m = draw(st.integers(2, max_rows))
    n = draw(st.integers(1, max_cols))
    flat = draw(st.lists(values, min_size=m * n, max_size=m * n))
    return [flat[t * n : (t + 1) * n] for t in range(m)]


def test_docstring_examples_run():
    result = doctest.testmod(metrics)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------- mean_total_variation


def test_mtv_hand_computed():
    # |0.5-0.2| + |0.4-0.5| = 0.3 + 0.1 = 0.4 over 2 steps
    assert mean_total_variation([0.2, 0.5, 0.4]) == pytest.approx(0.2, abs=1e-15)
    assert mean_total_variation([1, 3]) == 2.0
    # 1 + 1 + 1 over 3 steps: oscillation is penalised, not just net change
    assert mean_total_variation([0, 1, 0, 1]) == 1.0
    # 0.25 + 0.5 + 0.25 + 0 over 4 steps
    assert mean_total_variation([0.5, 0.75, 0.25, 0.5, 0.5]) == 0.25


def test_mtv_accepts_numpy_and_fractions_and_returns_float():
    result = mean_total_variation(np.array([0.2, 0.5, 0.4]))
    assert isinstance(result, float)
    assert result == pytest.approx(0.2, abs=1e-15)
    assert mean_total_variation((Fraction(1, 4), Fraction(3, 4))) == 0.5


@FAST
@given(score_lists)
def test_mtv_matches_float64_recomputation(scores):
    expected = float(np.mean(np.abs(np.diff(np.array(scores, dtype=np.float64)))))
    assert mean_total_variation(scores) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@FAST
@given(score_lists, finite)
def test_mtv_invariant_to_adding_a_constant(scores, constant):
    shifted = [s + constant for s in scores]
    assert mean_total_variation(shifted) == pytest.approx(mean_total_variation(scores), abs=1e-9)


@FAST
@given(score_lists, st.floats(min_value=1e-3, max_value=1e3))
def test_mtv_scales_with_a_positive_factor(scores, factor):
    scaled = [s * factor for s in scores]
    assert mean_total_variation(scaled) == pytest.approx(
        factor * mean_total_variation(scores), rel=1e-9, abs=1e-9
    )


@FAST
@given(finite, st.integers(2, 30))
def test_mtv_of_constant_sequence_is_zero(value, m):
    assert mean_total_variation([value] * m) == 0.0


@FAST
@given(score_lists)
def test_mtv_is_nonnegative_and_bounded_by_the_range(scores):
    assert 0.0 <= mean_total_variation(scores) <= (max(scores) - min(scores)) * (1 + 1e-12)


@pytest.mark.parametrize(
    ("scores", "pattern"),
    [
        ([0.5], r"needs at least two checkpoints, got 1"),
        ([], r"needs at least two checkpoints, got 0"),
        ([0.1, 0.2, math.nan], r"scores\[2\] is nan.*finite"),
        ([0.1, math.inf], r"scores\[1\] is inf.*finite"),
        ([-math.inf, 0.1], r"scores\[0\] is -inf.*finite"),
        ([0.1, True], r"scores\[1\] is True \(bool\).*real number.*bool is not allowed"),
        ([0.1, "0.2"], r"scores\[1\] is '0.2' \(str\).*real number"),
        ([0.1, None], r"scores\[1\] is None \(NoneType\)"),
        ([0.1, 1 + 2j], r"scores\[1\] is \(1\+2j\) \(complex\)"),
        ("0.5", r"scores must be a sequence, got str"),
        (0.5, r"scores must be a sequence, got float"),
    ],
)
def test_mtv_rejects_bad_input(scores, pattern):
    with pytest.raises(ValueError, match=pattern):
        mean_total_variation(scores)


# ---------------------------------------------------------------- instability_score


def test_is_hand_computed_3x4():
    outputs = [
        ["A", "B", "C", "D"],
        ["A", "X", "C", "E"],
        ["A", "B", "Y", "F"],
    ]
    # example 0: A,A,A -> 0 changes -> 0/2 = 0
    # example 1: B,X,B -> 2 changes (returning to B still counts) -> 2/2 = 1
    # example 2: C,C,Y -> 1 change -> 1/2 = 0.5
    # example 3: D,E,F -> 2 changes -> 2/2 = 1
    # IS = (0 + 1 + 0.5 + 1) / 4 = 0.625
    assert instability_score(outputs) == 0.625
    assert instability_score(outputs, similarity="exact") == 0.625
    assert instability_score(outputs, similarity=exact_match) == 0.625


def test_is_hand_computed_char_f1():
    # example 0: char_f1("cat", "cart") = 2*3/(3+4) = 6/7 -> change 1/7; example 1: no change.
    # IS = (1/7 + 0) / 2 = 1/14
    assert instability_score([["cat", "dog"], ["cart", "dog"]], similarity="char_f1") == pytest.approx(1 / 14)


def test_is_hand_computed_custom_callable():
    def closeness(a, b):
        return 1 - abs(a - b)

    # example 0: 0 -> 0.5 -> 1: changes 0.5 + 0.5 = 1 -> 1/2
    # example 1: 1 -> 1 -> 0: changes 0 + 1 = 1 -> 1/2
    outputs = [[0.0, 1.0], [0.5, 1.0], [1.0, 0.0]]
    assert instability_score(outputs, similarity=closeness) == 0.5


def test_is_accepts_bool_returning_similarity_and_numpy_rows():
    outputs = np.array([[1, 2], [1, 3]])
    # example 1 changes once in one step, example 0 never: (0 + 1) / 2
    assert instability_score(outputs, similarity=lambda a, b: a == b) == 0.5


@THOROUGH
@given(matrices(small_ints))
def test_is_exact_equals_brute_force_double_loop(outputs):
    m, n = len(outputs), len(outputs[0])
    changes = 0
    for i in range(n):
        for t in range(m - 1):
            if outputs[t][i] != outputs[t + 1][i]:
                changes += 1
    assert instability_score(outputs) == pytest.approx(changes / (n * (m - 1)), rel=1e-12, abs=1e-15)


@FAST
@given(matrices(short_texts), st.sampled_from(sorted(SIMILARITIES)))
def test_is_is_in_unit_interval(outputs, similarity):
    assert 0.0 <= instability_score(outputs, similarity=similarity) <= 1.0


@FAST
@given(
    st.lists(st.text(alphabet="ab c\n", max_size=4), min_size=1, max_size=5),
    st.integers(2, 6),
    st.sampled_from(sorted(SIMILARITIES)),
)
def test_is_of_identical_rows_is_zero(row, m, similarity):
    assert instability_score([list(row) for _ in range(m)], similarity=similarity) == 0.0


def test_is_of_always_changing_outputs_is_one():
    assert instability_score([[0, 0], [1, 1], [0, 0]]) == 1.0


@pytest.mark.parametrize(
    ("outputs", "similarity", "pattern"),
    [
        ([["A", "B"]], "exact", r"at least two checkpoints \(rows of outputs\), got 1"),
        ([], "exact", r"at least two checkpoints \(rows of outputs\), got 0"),
        ([[], []], "exact", r"zero examples"),
        ([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3]], "exact", r"ragged: row 2 has 3 outputs, expected 4"),
        ([[1, 2], [1, 2, 3]], "exact", r"ragged: row 1 has 3 outputs, expected 2"),
        ([[1], 5], "exact", r"outputs\[1\] must be a sequence, got int"),
        (["ab", "ab"], "exact", r"outputs\[0\] must be a sequence, got str"),
        ([[1], [1]], "f1", r"unknown similarity 'f1'; allowed: 'exact', 'char_f1'"),
        ([[1], [1]], 42, r"similarity must be one of 'exact', 'char_f1' or a callable.*got int"),
    ],
)
def test_is_rejects_bad_input(outputs, similarity, pattern):
    with pytest.raises(ValueError, match=pattern):
        instability_score(outputs, similarity=similarity)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(1.5, r"1\.5"), (-0.25, r"-0\.25"), (math.nan, "nan"), ("1", "'1'"), (None, "None")],
)
def test_is_rejects_similarity_returning_outside_unit_interval(value, shown):
    outputs = [["x", "y"], ["x", "z"]]
    with pytest.raises(
        ValueError, match=rf"similarity returned {shown} for example 0 between checkpoints 0 and 1"
    ):
        instability_score(outputs, similarity=lambda a, b: value)


def test_is_error_names_the_offending_pair_and_shortens_long_outputs():
    def picky(a, b):
        return 2.0 if b == "bad" else 1.0

    outputs = [["ok", "ok"], ["ok", "ok"], ["ok", "bad"]]
    with pytest.raises(ValueError, match=r"example 1 between checkpoints 1 and 2 \(outputs 'ok' and 'bad'\)"):
        instability_score(outputs, similarity=picky)
    long = "x" * 500
    with pytest.raises(ValueError, match=r"outputs 'x+\.\.\. and 'x+\.\.\.\)") as info:
        instability_score([[long], [long]], similarity=lambda a, b: 7)
    assert len(str(info.value)) < 200


# ---------------------------------------------------------------- similarities


def test_exact_match():
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match(3, 3) == 1.0
    assert exact_match(3, 2) == 0.0
    assert isinstance(exact_match(1, 1), float)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("abc", "abd", 2 / 3),  # overlap {a,b}=2: P=R=2/3 -> F1=2/3
        ("aab", "ab", 0.8),  # overlap 2: P=2/3, R=1 -> 2*(2/3)/(5/3) = 0.8
        ("aaa", "a", 0.5),  # overlap 1 (min count): P=1/3, R=1 -> (2/3)/(4/3) = 0.5
        ("cat", "cart", 6 / 7),  # overlap 3: P=1, R=3/4 -> 1.5/1.75 = 6/7
        ("ab", "ba", 1.0),  # multiset: order ignored (a fuzzy ratio would give 0.5)
        ("a a b", "ab\ta", 1.0),  # whitespace removed before counting
        ("abc", "xyz", 0.0),  # no overlap
        ("", "", 1.0),
        ("  ", "\n", 1.0),  # both empty after removing whitespace
        ("", "a", 0.0),
        ("a", " ", 0.0),
        (123, "321", 1.0),  # non-str converted with str()
        (None, "None", 1.0),
    ],
)
def test_char_f1_hand_computed(prediction, reference, expected):
    assert char_f1(prediction, reference) == pytest.approx(expected, abs=1e-15)


texts = st.text(alphabet="abcde \t\n", max_size=10)


@FAST
@given(texts, texts)
def test_char_f1_symmetric_and_in_unit_interval(a, b):
    assert char_f1(a, b) == char_f1(b, a)
    assert 0.0 <= char_f1(a, b) <= 1.0


@FAST
@given(st.text(max_size=12), st.lists(st.sampled_from([" ", "\t", "\n", "  "]), max_size=4), st.data())
def test_char_f1_is_one_for_equal_strings_whitespace_insensitive(text, spaces, data):
    assert char_f1(text, text) == 1.0
    padded = list(text)
    for space in spaces:
        padded.insert(data.draw(st.integers(0, len(padded))), space)
    assert char_f1("".join(padded), text) == 1.0


@THOROUGH
@given(texts, texts)
def test_char_f1_matches_precision_recall_formula(a, b):
    pred, ref = "".join(a.split()), "".join(b.split())
    overlap = sum(min(pred.count(ch), ref.count(ch)) for ch in set(pred))
    if not pred and not ref:
        expected = 1.0
    elif overlap == 0:
        expected = 0.0
    else:
        precision, recall = overlap / len(pred), overlap / len(ref)
        expected = 2 * precision * recall / (precision + recall)
    assert char_f1(a, b) == pytest.approx(expected, rel=1e-12)


def test_similarities_registry_and_resolve():
    assert set(SIMILARITIES) == {"exact", "char_f1"}
    assert SIMILARITIES["exact"] is exact_match
    assert SIMILARITIES["char_f1"] is char_f1
    assert resolve_similarity("exact") is exact_match
    assert resolve_similarity("char_f1") is char_f1

    def custom(a, b):
        return 1.0

    assert resolve_similarity(custom) is custom


@pytest.mark.parametrize(
    ("similarity", "pattern"),
    [
        ("EXACT", r"unknown similarity 'EXACT'; allowed: 'exact', 'char_f1', or a callable"),
        (None, r"similarity must be one of 'exact', 'char_f1' or a callable.*got NoneType"),
    ],
)
def test_resolve_similarity_rejects_unknown(similarity, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_similarity(similarity)
