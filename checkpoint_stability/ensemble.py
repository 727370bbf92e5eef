"""Combine a window of checkpoints' cached outputs into one output per example, without any model call.

Every function takes a window of snapshots ordered oldest first, newest last: ``outputs[s][i]`` is
snapshot ``s``'s output for example ``i`` and ``choice_logprobs[s][i][c]`` is snapshot ``s``'s
log-probability of choice ``c`` for example ``i`` (multiple-choice tasks only).
"""

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from checkpoint_stability.tasks.base import Task, TaskResult
from checkpoint_stability.validation import as_list, is_int, is_real

ENSEMBLE_METHODS = ("vote", "mean_prob")

Window = list[list[Any]]
LogprobWindow = list[list[list[float]]]


def vote(
    outputs: Sequence[Sequence[Hashable]],
    choice_logprobs: Sequence[Sequence[Sequence[float]]] | None = None,
) -> list:
    """Majority output per example across the window's snapshots.

    Outputs may be anything hashable (a choice index, a generated string, a token id...). When several
    outputs share the most votes:

    1. if ``choice_logprobs`` is given (outputs are then choice indices), the tied choice with the highest
       sum, over *all* snapshots of the window, of the log-probability each snapshot gave it wins;
    2. otherwise, or if those sums tie too, the tied output produced by the newest snapshot wins.

    >>> vote([[0, "x"], [1, "y"], [1, "x"]])
    [1, 'x']
    >>> vote([["a"], ["b"]])  # 1-1 tie, no log-probs: the newest snapshot wins
    ['b']
    >>> vote([[0], [1]], choice_logprobs=[[[-0.1, -2.3]], [[-0.9, -0.5]]])  # sums -1.0 vs -2.8
    [0]

    Raises:
        ValueError: an empty window, snapshots with different numbers of examples, an unhashable output,
            or ``choice_logprobs`` whose shape does not match ``outputs`` or that contains NaN/+inf.
    """
    window = _as_window(outputs, "outputs")
    logprobs = None
    if choice_logprobs is not None:
        logprobs = _validate_logprobs(choice_logprobs)
        _check_outputs_match_logprobs(window, logprobs)
    return [_vote_example(window, i, logprobs) for i in range(len(window[0]))]


def mean_prob(choice_logprobs: Sequence[Sequence[Sequence[float]]]) -> list[int]:
    """Choice with the highest probability averaged over the window's snapshots (multiple-choice only).

    Each snapshot's log-probabilities for an example are turned into probabilities with a softmax (so
    they need not be normalised), the probability vectors are averaged over snapshots, and the argmax is
    returned, ties going to the lowest choice index. Examples may have different numbers of choices, but
    every snapshot must give the same number for a given example.

    >>> import math
    >>> mean_prob([[[math.log(0.6), math.log(0.4)]], [[math.log(0.3), math.log(0.7)]]])  # 0.45 vs 0.55
    [1]

    Raises:
        ValueError: an empty window, snapshots with different numbers of examples, snapshots disagreeing
            on an example's number of choices, NaN/+inf log-probabilities, or a snapshot giving -inf to
            every choice of an example.
    """
    return _mean_prob(_validate_logprobs(choice_logprobs))


def combine(
    method: str,
    outputs: Sequence[Sequence[Hashable]] | None,
    choice_logprobs: Sequence[Sequence[Sequence[float]]] | None = None,
) -> list:
    """Combine a window with the ensemble ``method``, one of :data:`ENSEMBLE_METHODS`.

    ``"vote"`` is :func:`vote` on ``outputs`` (using ``choice_logprobs`` to break ties when given);
    ``"mean_prob"`` is :func:`mean_prob` on ``choice_logprobs``, whose shape is checked against
    ``outputs`` unless ``outputs`` is None.

    >>> combine("vote", [["a"], ["b"], ["a"]])
    ['a']

    Raises:
        ValueError: an unknown method, ``"mean_prob"`` without ``choice_logprobs``, or any error of the
            chosen method.
    """
    if method == "vote":
        if outputs is None:
            raise ValueError("ensemble method 'vote' needs outputs, got None")
        return vote(outputs, choice_logprobs)
    if method == "mean_prob":
        if choice_logprobs is None:
            raise ValueError(
                "ensemble method 'mean_prob' needs choice log-probabilities (multiple-choice tasks only); "
                "for tasks without them use ensemble='vote'"
            )
        logprobs = _validate_logprobs(choice_logprobs)
        if outputs is not None:
            _check_outputs_match_logprobs(_as_window(outputs, "outputs"), logprobs)
        return _mean_prob(logprobs)
    allowed = ", ".join(repr(name) for name in ENSEMBLE_METHODS)
    raise ValueError(f"unknown ensemble method {method!r}; allowed: {allowed}")


def ensemble_result(method: str, task: Task, window: Sequence[TaskResult]) -> TaskResult:
    """The ensemble of a window of raw results (oldest first), scored by ``task.score``: no model call.

    Log-probabilities break vote ties only when every result in the window has them.
    """
    logprobs = None
    if all(r.choice_logprobs is not None for r in window):
        logprobs = [r.choice_logprobs for r in window if r.choice_logprobs is not None]
    outputs = combine(method, [r.outputs for r in window], logprobs)
    newest = window[-1]
    return TaskResult(
        outputs=outputs, correct=task.score(outputs), targets=newest.targets, example_ids=newest.example_ids
    )


def _vote_example(window: Window, i: int, logprobs: LogprobWindow | None) -> Any:
    counts: Counter = Counter()
    for s, snapshot in enumerate(window):
        try:
            counts[snapshot[i]] += 1
        except TypeError:
            raise ValueError(
                f"outputs[{s}][{i}] is an unhashable {type(snapshot[i]).__name__}; vote needs hashable "
                "outputs (choice index, str, token id, tuple...)"
            ) from None
    top = max(counts.values())
    tied = [output for output, count in counts.items() if count == top]
    if len(tied) == 1:
        return tied[0]
    if logprobs is not None:
        sums = {choice: _sum_logprobs([snapshot[i][choice] for snapshot in logprobs]) for choice in tied}
        best = max(sums.values())
        tied = [choice for choice in tied if sums[choice] == best]
        if len(tied) == 1:
            return tied[0]
    tied_set = set(tied)
    for snapshot in reversed(window):
        if snapshot[i] in tied_set:
            return snapshot[i]
    raise AssertionError("unreachable: every tied output was produced by some snapshot")


def _sum_logprobs(values: list[float]) -> float:
    try:
        # fsum is exactly rounded, so mathematically equal sums compare equal whatever the order.
        return math.fsum(values)
    except OverflowError:
        # fsum raises where a float sum would saturate; saturating is the right answer for a ranking.
        return sum(values)


def _mean_prob(logprobs: LogprobWindow) -> list[int]:
    n_snapshots = len(logprobs)
    result = []
    for i in range(len(logprobs[0])):
        probs = [_softmax(logprobs[s][i], s, i) for s in range(n_snapshots)]
        means = [math.fsum(p[c] for p in probs) / n_snapshots for c in range(len(probs[0]))]
        # max() keeps the first of equal keys, i.e. the lowest choice index.
        result.append(max(range(len(means)), key=means.__getitem__))
    return result


def _softmax(vector: list[float], s: int, i: int) -> list[float]:
    peak = max(vector)
    if peak == -math.inf:
        raise ValueError(
            f"choice_logprobs[{s}][{i}] is -inf for every choice: snapshot {s} gives example {i} zero "
            "probability everywhere, so it cannot be normalised"
        )
    # Subtracting the max keeps exp() from overflowing (large logits) or underflowing to all zeros.
    exps = [math.exp(x - peak) for x in vector]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _as_window(window: Any, name: str) -> Window:
    snapshots = as_list(window, name)
    if not snapshots:
        raise ValueError(f"{name} is an empty window (zero snapshots); need at least one snapshot")
    snapshots = [as_list(snapshot, f"{name}[{s}]") for s, snapshot in enumerate(snapshots)]
    n = len(snapshots[0])
    for s, snapshot in enumerate(snapshots):
        if len(snapshot) != n:
            raise ValueError(
                f"{name} is ragged: snapshot {s} has {len(snapshot)} examples, expected {n} "
                "(the number in snapshot 0)"
            )
    return snapshots


def _validate_logprobs(choice_logprobs: Any) -> LogprobWindow:
    window = _as_window(choice_logprobs, "choice_logprobs")
    checked: LogprobWindow = []
    for s, snapshot in enumerate(window):
        rows = []
        for i, vector in enumerate(snapshot):
            values = as_list(vector, f"choice_logprobs[{s}][{i}]")
            if not values:
                raise ValueError(f"choice_logprobs[{s}][{i}] has zero choices; need at least one")
            if s > 0 and len(values) != len(checked[0][i]):
                raise ValueError(
                    f"snapshots disagree on the number of choices of example {i}: snapshot {s} has "
                    f"{len(values)}, snapshot 0 has {len(checked[0][i])}"
                )
            # Fast path for what tasks produce, plain floats: one pass, no per-value ABC checks (they
            # were most of the ensemble's time at window 20, benchmarks/RESULTS.md item 3). Anything
            # else, or a NaN/+inf, goes through the detailed check for its error message.
            if all(type(x) is float for x in values) and not any(x != x or x == math.inf for x in values):
                rows.append(values)
            else:
                rows.append([_checked_logprob(x, s, i, c) for c, x in enumerate(values)])
        checked.append(rows)
    return checked


def _checked_logprob(value: Any, s: int, i: int, c: int) -> float:
    where = f"choice_logprobs[{s}][{i}][{c}]"
    if not is_real(value):
        raise ValueError(f"{where} is {value!r} ({type(value).__name__}); expected a real number")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{where} is NaN; log-probabilities must be real numbers or -inf")
    if number == math.inf:
        raise ValueError(f"{where} is +inf; log-probabilities must be finite or -inf")
    return number


def _check_outputs_match_logprobs(window: Window, logprobs: LogprobWindow) -> None:
    if len(logprobs) != len(window):
        raise ValueError(
            f"choice_logprobs has {len(logprobs)} snapshots but outputs has {len(window)}; "
            "they must describe the same window"
        )
    if len(logprobs[0]) != len(window[0]):
        raise ValueError(
            f"choice_logprobs has {len(logprobs[0])} examples per snapshot but outputs has "
            f"{len(window[0])}; they must describe the same examples"
        )
    for s, snapshot in enumerate(window):
        for i, output in enumerate(snapshot):
            n_choices = len(logprobs[s][i])
            if type(output) is int and 0 <= output < n_choices:
                continue  # the common case, without the ABC check below
            if not is_int(output) or not 0 <= output < n_choices:
                raise ValueError(
                    f"outputs[{s}][{i}] is {output!r}, but with choice_logprobs the outputs must be choice "
                    f"indices in 0..{n_choices - 1}"
                )
