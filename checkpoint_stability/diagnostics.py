"""Checks on what a variant's numbers mean: collapsed predictions, balanced accuracy, weight drift, and
which window size to recommend.

A window average can look steady because it predicts the same answer everywhere (its MTV and IS are
then low for the wrong reason); :func:`majority_share`, :func:`balanced_accuracy` and
:func:`collapsed` say so. :func:`relative_drift` measures how far a model's weights are from another
state (the window average from the live model, or a snapshot from the previous one);
:class:`WeightDrift` keeps the sums behind the engine's per-snapshot drift, so that ranks holding
shards of one model can add theirs up.
:func:`recommend_window` turns a sweep of window sizes into one recommendation with its reason.

>>> outputs, targets = [0, 0, 0, 0, 1], [0, 1, 0, 1, 1]
>>> majority_share(outputs), round(balanced_accuracy(outputs, targets), 4)  # recalls 2/2 and 1/3
(0.8, 0.6667)
>>> collapsed(majority_share(outputs), raw_share=0.5, threshold=0.8)
True
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from checkpoint_stability.validation import as_list, is_int, is_real, require_int

_ROUNDING = 1e-12
"""How far a share may miss a bound of :func:`collapsed` by rounding alone and still meet it."""

_DRIFT_BLOCK = 1 << 20
"""Elements widened to float64 at once: the temporaries stay at a few MiB whatever the tensor's size."""


# ---------------------------------------------------------------- predictions


def _hashable(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item, where) for item in value)
    try:
        hash(value)
    except TypeError as error:
        raise ValueError(
            f"{where} is {value!r} ({type(value).__name__}); expected a hashable JSON value "
            "(str, number, bool, None, or a list of those)"
        ) from error
    return value


def _outputs(values: Any, name: str) -> list:
    items = as_list(values, name)
    if not items:
        raise ValueError(f"{name} must hold at least one output, got none")
    return [_hashable(value, f"{name}[{index}]") for index, value in enumerate(items)]


def majority_share(outputs: Sequence[Any]) -> float:
    """The share of the examples given the most frequent output.

    Outputs are compared as Python values, with lists turned into tuples (so ``[1, 2]`` and ``(1, 2)``
    are one output, and so are values Python calls equal, such as ``1`` and ``1.0``).

    >>> majority_share(["a", "b", "a", "a"])
    0.75
    >>> majority_share([[1, 2], [1, 2], [3]])  # 2 of 3
    0.6666666666666666

    Raises:
        ValueError: no outputs; an output that is not hashable once lists are tuples (a dict, a set).
    """
    items = _outputs(outputs, "outputs")
    return Counter(items).most_common(1)[0][1] / len(items)


def balanced_accuracy(outputs: Sequence[Any], targets: Sequence[Any]) -> float:
    """The mean, over the classes present in ``targets``, of each class's recall (macro recall).

    A class's recall is the share of the examples whose target is that class and whose output equals
    it. Classes that never occur in ``targets`` are ignored (they have no recall); an output naming such
    a class is simply a miss for its example's own class. A constant predictor scores ``1 / classes``
    whatever the class balance, where plain accuracy rewards it for picking the frequent class.
    Outputs and targets are compared as in :func:`majority_share`.

    >>> balanced_accuracy(["x", "x", "x", "x"], ["x", "x", "x", "y"])  # recalls 3/3 and 0/1
    0.5
    >>> balanced_accuracy([2, 0, 1], [0, 0, 1])  # class 2 is absent: recalls 1/2 and 1/1
    0.75

    Raises:
        ValueError: no examples; ``outputs`` and ``targets`` of different lengths; an unhashable value.
    """
    predicted = _outputs(outputs, "outputs")
    expected = _outputs(targets, "targets")
    if len(predicted) != len(expected):
        raise ValueError(
            "balanced_accuracy needs one output per target: "
            f"{len(predicted)} outputs, {len(expected)} targets"
        )
    totals = Counter(expected)
    hits = Counter(target for output, target in zip(predicted, expected, strict=True) if output == target)
    return math.fsum(hits[label] / count for label, count in totals.items()) / len(totals)


def _share(name: str, value: Any) -> float:
    if not is_real(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a share in [0, 1], got {value!r}")
    return float(value)


def collapsed(variant_share: float, raw_share: float, *, threshold: float = 0.9, margin: float = 0.2) -> bool:
    """Whether a variant's predictions collapsed onto one answer while the raw model's did not.

    The rule: the variant's majority share is at least ``threshold`` **and** raw's is at most
    ``threshold - margin`` (both bounds inclusive, up to 1e-12 of rounding). Both shares come from
    :func:`majority_share` on the same examples. The margin keeps a task whose answers are lopsided for
    every variant (raw at 0.88, the average at 0.91) from being called a collapse: raw must be clearly
    spread out while the variant is not.

    >>> collapsed(0.95, 0.40), collapsed(0.95, 0.75), collapsed(0.85, 0.40)
    (True, False, False)

    Raises:
        ValueError: a share outside [0, 1]; ``threshold`` outside (0, 1]; ``margin`` outside
            [0, threshold].
    """
    variant = _share("variant_share", variant_share)
    raw = _share("raw_share", raw_share)
    if not is_real(threshold) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a real number in (0, 1], got {threshold!r}")
    if not is_real(margin) or not 0 <= margin <= threshold:
        raise ValueError(f"margin must be a real number in [0, threshold={threshold}], got {margin!r}")
    # Shares are counts over counts: a raw share of 0.3 at threshold 0.6, margin 0.3 is on the bound,
    # though 0.6 - 0.3 rounds to 0.29999999999999993.
    return variant >= threshold - _ROUNDING and raw <= threshold - margin + _ROUNDING


# ---------------------------------------------------------------- weights


class DriftAccumulator:
    """Streaming :func:`relative_drift`: add tensors one by one (inside a pass over a state dict that
    is being loaded, gathered or written anyway), then read ``value()``.

    Sums of squares are kept in float64 and each tensor is widened block by block, so nothing is
    concatenated and the temporaries stay small whatever the model's size.

    >>> drift = DriftAccumulator()
    >>> drift.add("w", torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    >>> drift.add("steps", torch.tensor(7), torch.tensor(9))  # not floating: skipped
    >>> drift.value()  # 0.5 / 5
    0.1
    """

    def __init__(self) -> None:
        self._difference = 0.0
        self._current = 0.0
        self._names: set[str] = set()
        self.tensors = 0
        """How many floating tensors were added (non-floating ones are not counted)."""

    def add(self, name: str, current: torch.Tensor, reference: torch.Tensor) -> None:
        """Add one tensor of both states; a non-floating pair (integer buffers, masks) is skipped.

        Raises:
            ValueError: ``name`` added before; one side floating and the other not; different shapes.
        """
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added to the drift")
        if not isinstance(current, torch.Tensor) or not isinstance(reference, torch.Tensor):
            raise ValueError(
                f"tensor {name!r}: expected two tensors, got {type(current).__name__} and "
                f"{type(reference).__name__}"
            )
        if current.is_floating_point() != reference.is_floating_point():
            raise ValueError(
                f"tensor {name!r} is {current.dtype} in the current state and {reference.dtype} in the "
                "reference; both must be floating or both not"
            )
        if current.shape != reference.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(current.shape)} in the current state and "
                f"{tuple(reference.shape)} in the reference"
            )
        self._names.add(name)
        if not current.is_floating_point():
            return
        flat_current = current.detach().reshape(-1)
        flat_reference = reference.detach().reshape(-1)
        for start in range(0, flat_current.numel(), _DRIFT_BLOCK):
            block = flat_current[start : start + _DRIFT_BLOCK].to(torch.float64)
            other = flat_reference[start : start + _DRIFT_BLOCK].to(device=block.device, dtype=torch.float64)
            self._current += float(block.square().sum())
            # Not in place: for a float64 tensor, .to(float64) is the caller's own tensor.
            self._difference += float((block - other).square().sum())
        self.tensors += 1

    def value(self) -> float:
        """``‖current − reference‖₂ / ‖current‖₂`` over the floating tensors added so far.

        0.0 when both norms are 0; ``inf`` when only the current state is all zeros; NaN when a tensor
        holds NaN.

        Raises:
            ValueError: no floating tensor was added.
        """
        if self.tensors == 0:
            raise ValueError("relative drift needs at least one floating tensor; none was added")
        if self._current == 0:
            return 0.0 if self._difference == 0 else math.inf
        return math.sqrt(self._difference) / math.sqrt(self._current)


def relative_drift(current: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """``‖current − reference‖₂ / ‖current‖₂`` over every floating tensor of two state dicts.

    Both norms run over all floating tensors as one vector (sums of squares in float64, tensor by
    tensor); non-floating tensors (integer buffers, and complex ones) are skipped, but every name must
    be on both sides.

    >>> now = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0]), "n": torch.tensor(5)}
    >>> before = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0]), "n": torch.tensor(4)}
    >>> relative_drift(now, before)  # sqrt(1) / sqrt(9 + 16)
    0.2

    Raises:
        ValueError: a name missing on either side (the error names it); as :meth:`DriftAccumulator.add`
            and :meth:`DriftAccumulator.value`.
    """
    for names, side, other in ((current, "current", reference), (reference, "reference", current)):
        missing = [name for name in names if name not in other]
        if missing:
            absent_from = "reference" if side == "current" else "current"
            raise ValueError(
                f"tensor {missing[0]!r} is in the {side} state but not in the {absent_from} state"
                + (f" ({len(missing) - 1} more names missing)" if len(missing) > 1 else "")
            )
    drift = DriftAccumulator()
    for name, tensor in current.items():
        drift.add(name, tensor, reference[name])
    return drift.value()


def _ratio(difference_sq: float | None, current_sq: float) -> float | None:
    """``sqrt(difference_sq) / sqrt(current_sq)`` as :meth:`DriftAccumulator.value` defines it, with
    None for a missing or non-finite result (a NaN in the weights, or an all-zero current state)."""
    if difference_sq is None:
        return None
    if current_sq == 0:
        value = 0.0 if difference_sq == 0 else math.inf
    else:
        value = math.sqrt(difference_sq) / math.sqrt(current_sq)
    return value if math.isfinite(value) else None


def _sum_of_squares(name: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    # NaN and infinity are kept: a tensor holding them makes the drift undefined, which relative() says.
    if not is_real(value) or value < 0:
        allowed = "None or " if optional else ""
        raise ValueError(f"{name} must be {allowed}a sum of squares (a real number >= 0), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class WeightDrift:
    """How far the weights moved at one snapshot, as the sums of squares behind the two relative drifts.

    ``previous = ‖θ_t − θ_prev‖ / ‖θ_t‖`` (from the snapshot before it in the window) and
    ``average = ‖θ_t − θ̄‖ / ‖θ_t‖`` (from the window average that ``t`` joined), each norm over every
    floating tensor of the snapshot as one vector, as stored in the buffer. The sums are kept, not just
    the ratios, because a ratio does not add up across ranks: each rank of a sharded run measures its
    own shards, and :meth:`combine` adds the sums into the whole model's drift.

    >>> drift = WeightDrift(step=20, previous_step=10, n_models=2, current_sq=25.0, previous_sq=1.0,
    ...                     average_sq=0.25)
    >>> drift.relative()  # sqrt(1) / 5 and sqrt(0.25) / 5
    (0.2, 0.1)
    >>> other = WeightDrift(20, 10, 2, current_sq=75.0, previous_sq=3.0, average_sq=0.75)
    >>> WeightDrift.combine([drift, other]).relative()  # sqrt(4) / 10 and sqrt(1) / 10
    (0.2, 0.1)
    """

    step: int
    """The step of the snapshot ``θ_t``."""
    previous_step: int | None
    """The step of ``θ_prev``, the newest snapshot in the window before ``t``; None when the window was
    empty (the first snapshot, or the window restarted)."""
    n_models: int
    """How many snapshots the window average ``θ̄`` held once ``t`` joined (``t`` included)."""
    current_sq: float
    """``‖θ_t‖²``."""
    previous_sq: float | None
    """``‖θ_t − θ_prev‖²``; None with ``previous_step``."""
    average_sq: float
    """``‖θ_t − θ̄‖²``."""

    def __post_init__(self) -> None:
        step = require_int("step", self.step, 0)
        previous_step = require_int("previous_step", self.previous_step, 0, optional=True)
        if previous_step is not None and previous_step >= step:
            raise ValueError(f"previous_step must be before step {step}, got {previous_step}")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "previous_step", previous_step)
        object.__setattr__(self, "n_models", require_int("n_models", self.n_models, 1))
        object.__setattr__(self, "current_sq", _sum_of_squares("current_sq", self.current_sq))
        object.__setattr__(self, "average_sq", _sum_of_squares("average_sq", self.average_sq))
        previous_sq = _sum_of_squares("previous_sq", self.previous_sq, optional=True)
        if (previous_sq is None) != (previous_step is None):
            raise ValueError(
                f"previous_sq and previous_step go together: got previous_sq={self.previous_sq!r} with "
                f"previous_step={self.previous_step!r}"
            )
        object.__setattr__(self, "previous_sq", previous_sq)

    def relative(self) -> tuple[float | None, float | None]:
        """``(previous, average)``: the two relative drifts, each None where undefined (no previous
        snapshot) or not finite (NaN in the weights; an all-zero ``θ_t`` that moved).

        >>> WeightDrift(5, None, 1, current_sq=4.0, previous_sq=None, average_sq=0.0).relative()
        (None, 0.0)
        """
        return _ratio(self.previous_sq, self.current_sq), _ratio(self.average_sq, self.current_sq)

    @classmethod
    def combine(cls, parts: Iterable[WeightDrift]) -> WeightDrift:
        """The drift of the whole model from the drifts of its shards (one per rank): the sums added.

        Every part must describe the same snapshot against the same references: the same ``step``,
        ``previous_step`` and ``n_models``.

        Raises:
            ValueError: no parts; a part that is not a ``WeightDrift``; parts that disagree on ``step``,
                ``previous_step`` or ``n_models`` (the error names the first that differs).
        """
        items = as_list(parts, "parts")
        if not items:
            raise ValueError("WeightDrift.combine needs at least one part, got none")
        for index, part in enumerate(items):
            if not isinstance(part, WeightDrift):
                raise ValueError(f"parts[{index}] is a {type(part).__name__}, expected a WeightDrift")
        first = items[0]
        for index, part in enumerate(items[1:], start=1):
            for name in ("step", "previous_step", "n_models"):
                if getattr(part, name) != getattr(first, name):
                    raise ValueError(
                        f"parts disagree on {name}: parts[0] has {getattr(first, name)!r}, parts[{index}] "
                        f"has {getattr(part, name)!r}; only drifts of one snapshot against the same "
                        "references can be combined"
                    )
        return cls(
            step=first.step,
            previous_step=first.previous_step,
            n_models=first.n_models,
            current_sq=math.fsum(part.current_sq for part in items),
            previous_sq=(
                None if first.previous_step is None else math.fsum(part.previous_sq or 0.0 for part in items)
            ),
            average_sq=math.fsum(part.average_sq for part in items),
        )


# ---------------------------------------------------------------- window size


def _finite(value: Any, where: str) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite real number, got {value!r}")
    return float(value)


def _row(row: Any, index: int) -> tuple[int, float, float | None]:
    where = f"rows[{index}]"
    if not isinstance(row, Mapping):
        raise ValueError(
            f"{where} must be a dict with n, mtv and confirmation_diff, got {type(row).__name__}"
        )
    n = row.get("n")
    if not is_int(n) or n < 1:
        raise ValueError(f"{where}['n'] must be a window size (an integer >= 1), got {n!r}")
    mtv = _finite(row.get("mtv"), f"{where}['mtv']")
    if mtv < 0:
        raise ValueError(f"{where}['mtv'] must be >= 0, got {mtv!r}")
    difference = row.get("confirmation_diff")
    if difference is None:
        return int(n), mtv, None
    if not isinstance(difference, Mapping):
        raise ValueError(
            f"{where}['confirmation_diff'] must be None or an interval dict with low, high and estimate "
            f"(Interval.to_json()), got {type(difference).__name__}"
        )
    low, high, _ = (
        _finite(difference.get(key), f"{where}['confirmation_diff'][{key!r}]")
        for key in ("low", "high", "estimate")
    )
    if low > high:
        raise ValueError(f"{where}['confirmation_diff'] has low {low!r} above high {high!r}")
    return int(n), mtv, high


def recommend_window(rows: Sequence[Mapping[str, Any]], *, tolerance: float = 0.1) -> dict[str, Any]:
    """The window size to recommend from a sweep: the smallest steady one that does not lose.

    ``rows`` hold one measured window size each: ``{"n": int, "mtv": float, "confirmation_diff":
    {"low", "high", "estimate"} or None}``, where ``confirmation_diff`` is the paired interval of
    (variant − raw) on the confirmation half (:func:`checkpoint_stability.bootstrap.paired_difference`
    ``.to_json()``), None when unavailable (a missing key counts as None).

    The rule: among the window sizes whose MTV is at most ``(1 + tolerance)`` × the lowest MTV
    measured, and whose confirmation difference is not significantly below 0 (its upper bound is
    ``>= 0``, or there is none), the smallest ``n``. A smaller window costs less memory and follows the
    model sooner, so among near-equally steady windows the smallest wins.

    Returns ``{"n": the window or None, "rule": the rule as a sentence with its numbers,
    "candidates": the eligible sizes ascending, "excluded": [{"n", "reason"}] ascending, "reason":
    None, or why nothing is recommended}``.

    >>> rows = [
    ...     {"n": 2, "mtv": 0.050, "confirmation_diff": None},
    ...     {"n": 5, "mtv": 0.021, "confirmation_diff": {"low": -0.02, "high": 0.01, "estimate": -0.005}},
    ...     {"n": 10, "mtv": 0.020, "confirmation_diff": {"low": -0.01, "high": 0.03, "estimate": 0.01}},
    ... ]
    >>> result = recommend_window(rows)
    >>> result["n"], result["candidates"], [row["n"] for row in result["excluded"]]
    (5, [5, 10], [2])

    Raises:
        ValueError: ``tolerance`` not a finite real number >= 0; a row without a window size ``n``
            (integer >= 1) or a finite ``mtv`` >= 0; the same ``n`` twice; a ``confirmation_diff``
            that is not None or a dict with finite ``low`` <= ``high`` and ``estimate``.
    """
    tolerance = _finite(tolerance, "tolerance")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    parsed = sorted(
        (_row(row, index) for index, row in enumerate(as_list(rows, "rows"))), key=lambda row: row[0]
    )
    sizes = [n for n, _, _ in parsed]
    repeated = sorted({n for n in sizes if sizes.count(n) > 1})
    if repeated:
        raise ValueError(f"rows must measure each window size once; n = {repeated[0]} appears more than once")
    if not parsed:
        reason = "no window size was measured"
        return {"n": None, "rule": reason, "candidates": [], "excluded": [], "reason": reason}

    lowest = min(mtv for _, mtv, _ in parsed)
    lowest_at = min(n for n, mtv, _ in parsed if mtv == lowest)
    bound = (1 + tolerance) * lowest
    candidates: list[int] = []
    excluded: list[dict[str, Any]] = []
    worse: list[str] = []
    for n, mtv, high in parsed:
        if mtv > bound:
            excluded.append({"n": n, "reason": f"MTV {mtv:.4g} > {bound:.4g}"})
        elif high is not None and high < 0:
            worse.append(f"n = {n}")
            reason = f"confirmation difference significantly below 0 (upper bound {high:.4g} < 0)"
            excluded.append({"n": n, "reason": reason})
        else:
            candidates.append(n)
    chosen = candidates[0] if candidates else None
    rule = (
        f"the smallest window whose MTV is at most (1 + {tolerance:g}) × {lowest:.4g} = {bound:.4g} (the "
        f"lowest MTV measured, at n = {lowest_at}) and whose confirmation difference (variant − raw) is "
        "not significantly below 0 (upper bound >= 0, or unavailable)"
    )
    if chosen is None:
        reason = (
            f"every window within the MTV bound ({', '.join(worse)}) is significantly worse than raw "
            "on the confirmation half"
        )
        return {"n": None, "rule": f"{rule}: none", "candidates": [], "excluded": excluded, "reason": reason}
    return {
        "n": chosen,
        "rule": f"{rule}: n = {chosen}",
        "candidates": candidates,
        "excluded": excluded,
        "reason": None,
    }
