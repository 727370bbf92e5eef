import doctest
import math

import pytest
import torch

from checkpoint_stability import diagnostics
from checkpoint_stability.diagnostics import (
    DriftAccumulator,
    balanced_accuracy,
    collapsed,
    majority_share,
    recommend_window,
    relative_drift,
)


def test_doctests():
    result = doctest.testmod(diagnostics)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------- majority share


def test_majority_share_by_hand():
    assert majority_share([2, 2, 1, 2, 0, 2, 1]) == 4 / 7  # four 2s of seven
    assert majority_share(["yes", "no"]) == 1 / 2
    assert majority_share(["only"]) == 1.0
    assert majority_share(["a", "b", "c", "a", "b", "a", "d", "a", "e", "f"]) == 4 / 10


def test_majority_share_treats_lists_as_tuples():
    assert majority_share([[1, 2], (1, 2), [2, 1], [[1], 2], [[1], 2]]) == 2 / 5
    assert majority_share([[0, [1]], [0, [1]], [0, [1]], None]) == 3 / 4


def test_majority_share_errors():
    with pytest.raises(ValueError, match="outputs must hold at least one output"):
        majority_share([])
    with pytest.raises(ValueError, match=r"outputs\[1\] is \{'a': 1\} \(dict\); expected a hashable"):
        majority_share(["x", {"a": 1}])
    with pytest.raises(ValueError, match="outputs must be a sequence"):
        majority_share("aab")


# ---------------------------------------------------------------- balanced accuracy


def test_balanced_accuracy_by_hand():
    # Three classes. a: 2 of 3 right; b: 1 of 2 right; c: 0 of 1 right -> (2/3 + 1/2 + 0) / 3.
    outputs = ["a", "a", "b", "b", "a", "a"]
    targets = ["a", "a", "a", "b", "b", "c"]
    assert balanced_accuracy(outputs, targets) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_a_constant_predictor_scores_one_over_the_classes_whatever_the_balance():
    targets = [0] * 9 + [1]
    assert balanced_accuracy([0] * 10, targets) == pytest.approx(1 / 2)  # plain accuracy would be 0.9
    assert balanced_accuracy([0] * 6, [0, 1, 2, 0, 1, 2]) == pytest.approx(1 / 3)


def test_classes_absent_from_the_targets_are_ignored_and_predicting_them_is_a_miss():
    # Targets hold classes 0 and 1 only. Class 3 is predicted but never a target: it adds no recall
    # term, and the example it was predicted for (target 1) is a miss. 0: 2 of 2; 1: 1 of 2.
    assert balanced_accuracy([0, 0, 1, 3], [0, 0, 1, 1]) == pytest.approx((1 + 1 / 2) / 2)
    # Everything right: 1.0, whatever the class counts.
    assert balanced_accuracy(["x", "y", "y", "y"], ["x", "y", "y", "y"]) == 1.0


def test_balanced_accuracy_with_list_outputs():
    outputs = [[1, 2], [3], [3]]
    targets = [(1, 2), [3], (1, 2)]
    assert balanced_accuracy(outputs, targets) == pytest.approx((1 / 2 + 1) / 2)


def test_balanced_accuracy_errors():
    with pytest.raises(ValueError, match="3 outputs, 2 targets"):
        balanced_accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="outputs must hold at least one output"):
        balanced_accuracy([], [])
    with pytest.raises(ValueError, match=r"targets\[0\] is \{1\}"):
        balanced_accuracy([1], [{1}])


# ---------------------------------------------------------------- collapse


def test_collapsed_follows_the_rule():
    # variant >= 0.9 and raw <= 0.7
    assert collapsed(0.9, 0.7)
    assert collapsed(1.0, 0.25)
    assert not collapsed(0.89, 0.25)  # the variant is not collapsed
    assert not collapsed(0.95, 0.71)  # raw is already lopsided
    assert not collapsed(0.5, 0.5)
    assert collapsed(0.6, 0.3, threshold=0.6, margin=0.3)
    assert not collapsed(0.6, 0.31, threshold=0.6, margin=0.3)
    assert collapsed(0.9, 0.9, margin=0)  # margin 0: both at the threshold
    assert not collapsed(0.95, 0.91, margin=0)
    assert collapsed(27 / 30, 21 / 30)  # shares counted from 30 examples, on both bounds


def test_collapsed_on_shares_counted_from_outputs():
    raw = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # share 3/10
    average = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # share 9/10
    assert collapsed(majority_share(average), majority_share(raw))
    assert not collapsed(majority_share(raw), majority_share(average))


@pytest.mark.parametrize(
    ("arguments", "keywords", "message"),
    [
        ((1.2, 0.5), {}, r"variant_share must be a share in \[0, 1\], got 1.2"),
        ((0.5, -0.1), {}, r"raw_share must be a share in \[0, 1\], got -0.1"),
        ((0.5, math.nan), {}, "raw_share must be a share"),
        ((True, 0.5), {}, "variant_share must be a share"),
        ((0.5, 0.5), {"threshold": 0}, r"threshold must be a real number in \(0, 1\], got 0"),
        ((0.5, 0.5), {"threshold": 1.5}, "threshold must be"),
        ((0.5, 0.5), {"margin": -0.1}, r"margin must be a real number in \[0, threshold=0.9\], got -0.1"),
        ((0.5, 0.5), {"threshold": 0.5, "margin": 0.6}, "margin must be"),
    ],
)
def test_collapsed_errors(arguments, keywords, message):
    with pytest.raises(ValueError, match=message):
        collapsed(*arguments, **keywords)


# ---------------------------------------------------------------- drift


def oracle_drift(current, reference):
    """Concatenate every floating tensor, flattened, in float64, and take the two norms."""
    names = [name for name in current if current[name].is_floating_point()]
    now = torch.cat([current[name].reshape(-1).to(torch.float64) for name in names])
    then = torch.cat([reference[name].reshape(-1).to(torch.float64) for name in names])
    return (torch.linalg.vector_norm(now - then) / torch.linalg.vector_norm(now)).item()


def states(seed):
    generator = torch.Generator().manual_seed(seed)
    current = {
        "embed.weight": torch.randn(50, 8, generator=generator),
        "block.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "block.bias": torch.randn(8, generator=generator, dtype=torch.float64),
        "norm.running_mean": torch.randn(8, generator=generator).half(),
        "norm.num_batches_tracked": torch.tensor(12),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(6, 4, generator=generator).t(),  # not contiguous
    }
    reference = {
        name: (tensor + 0.1 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        if tensor.is_floating_point()
        else tensor.clone() + 0
        for name, tensor in current.items()
    }
    reference["norm.num_batches_tracked"] = torch.tensor(11)
    reference["mask"] = torch.tensor([False, False])
    return current, reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_equals_a_float64_recomputation_over_the_concatenated_tensors(seed):
    current, reference = states(seed)
    assert relative_drift(current, reference) == pytest.approx(oracle_drift(current, reference), rel=1e-12)


def test_drift_leaves_its_inputs_as_they_were():
    current, reference = states(5)
    before = {name: tensor.clone() for name, tensor in current.items()}
    before_reference = {name: tensor.clone() for name, tensor in reference.items()}
    relative_drift(current, reference)
    for name in current:
        assert torch.equal(current[name], before[name]), name
        assert torch.equal(reference[name], before_reference[name]), name


def test_drift_across_blocks_equals_the_oracle(monkeypatch):
    monkeypatch.setattr(diagnostics, "_DRIFT_BLOCK", 7)  # 400, 64, ... elements cut into blocks of 7
    current, reference = states(3)
    assert relative_drift(current, reference) == pytest.approx(oracle_drift(current, reference), rel=1e-12)


def test_the_accumulator_streams_the_same_value_in_any_order():
    current, reference = states(4)
    drift = DriftAccumulator()
    for name in reversed(list(current)):
        drift.add(name, current[name], reference[name])
    assert drift.tensors == 6  # the two non-floating tensors are skipped
    assert drift.value() == pytest.approx(oracle_drift(current, reference), rel=1e-12)


def test_drift_by_hand():
    current = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[2.0]])}
    reference = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[1.0]])}
    # difference (0, 2, 1): norm sqrt(5); current (1, 2, 2): norm 3
    assert relative_drift(current, reference) == pytest.approx(math.sqrt(5) / 3)
    assert relative_drift(current, current) == 0.0


def test_drift_of_an_all_zero_state():
    zeros = {"w": torch.zeros(3)}
    assert relative_drift(zeros, zeros) == 0.0
    assert relative_drift(zeros, {"w": torch.ones(3)}) == math.inf


def test_a_name_missing_on_either_side_is_named():
    current = {"a": torch.ones(2), "b": torch.ones(2)}
    with pytest.raises(ValueError, match="tensor 'b' is in the current state but not in the reference state"):
        relative_drift(current, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="tensor 'c' is in the reference state but not in the current state"):
        relative_drift(current, {**current, "c": torch.ones(1)})
    # A missing non-floating tensor is refused too.
    with pytest.raises(ValueError, match="tensor 'step'"):
        relative_drift({**current, "step": torch.tensor(1)}, current)


def test_drift_errors():
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        relative_drift({"w": torch.ones(2)}, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'w' is torch\.float32 in the current state and torch\.int64"):
        relative_drift({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="at least one floating tensor"):
        relative_drift({"n": torch.tensor(1)}, {"n": torch.tensor(2)})
    with pytest.raises(ValueError, match="at least one floating tensor"):
        relative_drift({}, {})
    drift = DriftAccumulator()
    drift.add("w", torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="tensor 'w' was already added"):
        drift.add("w", torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="expected two tensors"):
        drift.add("x", [1.0], torch.ones(1))  # type: ignore[arg-type]


# ---------------------------------------------------------------- window recommendation


def interval(low, high):
    return {"low": low, "high": high, "estimate": (low + high) / 2}


def test_recommend_the_smallest_window_within_the_tolerance():
    rows = [
        {"n": 20, "mtv": 0.010, "confirmation_diff": interval(-0.01, 0.02)},  # the lowest MTV
        {"n": 2, "mtv": 0.030, "confirmation_diff": interval(-0.02, 0.01)},  # 0.030 > 0.011
        {"n": 10, "mtv": 0.0105, "confirmation_diff": interval(-0.01, 0.02)},  # within 0.011
        {"n": 5, "mtv": 0.0111, "confirmation_diff": None},  # just outside 0.011
    ]
    result = recommend_window(rows)
    assert result["n"] == 10
    assert result["candidates"] == [10, 20]
    assert [row["n"] for row in result["excluded"]] == [2, 5]
    assert result["reason"] is None
    assert "(1 + 0.1) × 0.01 = 0.011" in result["rule"]
    assert "at n = 20" in result["rule"]
    assert result["rule"].endswith("n = 10")
    # A wider tolerance lets n = 5 in; a larger one n = 2 as well.
    assert recommend_window(rows, tolerance=0.2)["n"] == 5
    assert recommend_window(rows, tolerance=2.0)["n"] == 2
    # Zero tolerance: only the lowest MTV.
    assert recommend_window(rows, tolerance=0)["candidates"] == [20]


def test_a_window_significantly_worse_on_confirmation_is_excluded():
    rows = [
        {"n": 2, "mtv": 0.020, "confirmation_diff": interval(-0.05, -0.01)},  # significantly below 0
        {"n": 5, "mtv": 0.019, "confirmation_diff": interval(-0.03, 0.0)},  # upper bound 0: kept
        {"n": 10, "mtv": 0.019, "confirmation_diff": interval(0.01, 0.04)},
    ]
    result = recommend_window(rows)
    assert result["n"] == 5
    assert result["candidates"] == [5, 10]
    assert result["excluded"] == [
        {"n": 2, "reason": "confirmation difference significantly below 0 (upper bound -0.01 < 0)"}
    ]


def test_ties_in_mtv_go_to_the_smallest_window():
    rows = [
        {"n": 10, "mtv": 0.02, "confirmation_diff": None},
        {"n": 5, "mtv": 0.02, "confirmation_diff": None},
        {"n": 20, "mtv": 0.02, "confirmation_diff": None},
    ]
    result = recommend_window(rows, tolerance=0)
    assert result["n"] == 5
    assert result["candidates"] == [5, 10, 20]
    assert "at n = 5" in result["rule"]


def test_an_mtv_exactly_on_the_bound_is_within_it():
    rows = [
        {"n": 4, "mtv": 0.75, "confirmation_diff": None},  # (1 + 0.5) * 0.5 = 0.75 exactly in binary
        {"n": 8, "mtv": 0.5, "confirmation_diff": None},
    ]
    assert recommend_window(rows, tolerance=0.5)["n"] == 4


def test_no_candidate_gives_none_with_the_reason():
    rows = [
        {"n": 2, "mtv": 0.05, "confirmation_diff": None},
        {"n": 5, "mtv": 0.02, "confirmation_diff": interval(-0.04, -0.002)},
        {"n": 10, "mtv": 0.021, "confirmation_diff": interval(-0.03, -0.001)},
    ]
    result = recommend_window(rows)
    assert result["n"] is None
    assert result["candidates"] == []
    assert result["reason"] == (
        "every window within the MTV bound (n = 5, n = 10) is significantly worse than raw on the "
        "confirmation half"
    )
    assert result["rule"].endswith(": none")


def test_no_rows_gives_none_with_the_reason():
    result = recommend_window([])
    assert result["n"] is None
    assert result["reason"] == "no window size was measured"


def test_a_missing_confirmation_diff_counts_as_unavailable():
    assert recommend_window([{"n": 3, "mtv": 0.1}])["n"] == 3


@pytest.mark.parametrize(
    ("rows", "keywords", "message"),
    [
        ([{"n": 0, "mtv": 0.1}], {}, r"rows\[0\]\['n'\] must be a window size"),
        ([{"n": True, "mtv": 0.1}], {}, r"rows\[0\]\['n'\] must be a window size"),
        ([{"mtv": 0.1}], {}, r"rows\[0\]\['n'\]"),
        ([{"n": 2, "mtv": 0.1}, {"n": 3, "mtv": None}], {}, r"rows\[1\]\['mtv'\] must be a finite real"),
        ([{"n": 2, "mtv": math.nan}], {}, r"rows\[0\]\['mtv'\] must be a finite real"),
        ([{"n": 2, "mtv": -0.1}], {}, r"rows\[0\]\['mtv'\] must be >= 0"),
        ([{"n": 2, "mtv": 0.1}, {"n": 2, "mtv": 0.2}], {}, "n = 2 appears more than once"),
        (
            [{"n": 2, "mtv": 0.1}, {"n": 2, "mtv": 0.1, "confirmation_diff": interval(0, 1)}],
            {},
            "n = 2 appears more than once",
        ),
        ([{"n": 2, "mtv": 0.1, "confirmation_diff": 0.3}], {}, "must be None or an interval dict"),
        ([{"n": 2, "mtv": 0.1, "confirmation_diff": {"low": 0}}], {}, r"\['high'\] must be a finite"),
        ([{"n": 2, "mtv": 0.1, "confirmation_diff": interval(0.2, 0.1)}], {}, "low 0.2 above high 0.1"),
        (["n=2"], {}, r"rows\[0\] must be a dict"),
        ([{"n": 2, "mtv": 0.1}], {"tolerance": -0.1}, "tolerance must be >= 0"),
        ([{"n": 2, "mtv": 0.1}], {"tolerance": math.inf}, "tolerance must be a finite real"),
    ],
)
def test_recommend_window_errors(rows, keywords, message):
    with pytest.raises(ValueError, match=message):
        recommend_window(rows, **keywords)


def test_an_interval_from_the_bootstrap_module_is_accepted():
    from checkpoint_stability.bootstrap import paired_difference

    better = paired_difference([1, 1, 1, 1, 0, 1], [1, 0, 1, 0, 0, 1], resamples=200).to_json()
    assert recommend_window([{"n": 5, "mtv": 0.1, "confirmation_diff": better}])["n"] == 5


def test_balanced_accuracy_equals_torchmetrics_macro_accuracy():
    """torchmetrics (the field's metric library) as a second oracle: macro-averaged multiclass accuracy
    is the mean per-class recall. They agree whenever every class occurs among the targets; a class
    that is predicted but never a target counts in torchmetrics' mean (with recall 0) and not in ours,
    as in scikit-learn's ``balanced_accuracy_score``, whose definition we follow."""
    torchmetrics = pytest.importorskip("torchmetrics")
    import torch

    from checkpoint_stability.diagnostics import balanced_accuracy as ours

    generator = torch.Generator().manual_seed(0)
    for classes, n in ((2, 7), (4, 50), (5, 300)):
        targets = torch.cat([torch.arange(classes), torch.randint(0, classes, (n,), generator=generator)])
        n = len(targets)
        outputs = torch.randint(0, classes, (n,), generator=generator)
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=classes, average="macro")
        expected = float(metric(outputs, targets))
        assert ours(outputs.tolist(), targets.tolist()) == pytest.approx(expected, abs=1e-6)
