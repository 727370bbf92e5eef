"""FunctionTask: any user function that predicts from a model becomes a Task."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.metrics import TASK_METRICS
from checkpoint_stability.tasks.base import TaskResult, plain_value, validate_example_ids, validate_task_name


class FunctionTask:
    """A task defined by a function ``predict(model)`` and the targets it is scored against.

    ``predict`` returns one output per example (a choice index, a token id, a string), or a mapping
    ``{"choice_logprobs": [[...], ...]}`` (optionally with ``"outputs"``; without it the output is the
    argmax choice) for multiple-choice tasks, which enables ``mean_prob`` ensembles and the vote's
    log-probability tie-break. ``metric`` is ``"exact_match"`` (1 if the output equals the target) or
    ``"char_f1"`` (for free-form strings).

    Under ``torch.distributed`` every rank calls ``predict`` on the whole task (it must return the same
    outputs everywhere); splitting examples across ranks is left to ``predict``.

    ``predict`` runs with the model in eval mode (dropout off) and gradients off, as every task's
    evaluation does; afterwards every submodule's train/eval flag, the grad mode and the random
    generators are as they were, so ``predict`` need not do that itself.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks import FunctionTask
        >>> xs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> task = FunctionTask("toy", lambda model: model(xs).argmax(-1).tolist(), targets=[0, 1, 1])
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> result = task.evaluate(model)
        >>> result.outputs, result.correct, result.score
        ([0, 1, 0], [1.0, 1.0, 0.0], 0.6666666666666666)
    """

    def __init__(
        self,
        name: str,
        predict: Callable[[torch.nn.Module], Sequence | Mapping],
        targets: Sequence,
        *,
        metric: str = "exact_match",
        example_ids: Sequence | None = None,
        kind: str = "function",
    ):
        self.name = validate_task_name(name)
        if not callable(predict):
            raise TypeError(f"task {name!r}: predict must be callable, got {type(predict).__name__}")
        if metric not in TASK_METRICS:
            raise ValueError(f"task {name!r}: metric must be one of {sorted(TASK_METRICS)}, got {metric!r}")
        targets = list(targets)
        if not targets:
            raise ValueError(f"task {name!r}: targets is empty; a task needs at least one example")
        example_ids = validate_example_ids(name, example_ids, len(targets))
        for index, value in enumerate(targets):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"task {name!r}: target of example {index} is not JSON-serialisable"
                ) from error
        self.predict = predict
        # Plain, as the outputs are: a tuple target still matches a tuple output (both become lists).
        self.targets = [plain_value(value) for value in targets]
        self.example_ids = example_ids
        self.metric = metric
        self.kind = kind
        self._similarity = TASK_METRICS[metric]

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        with isolated_evaluation(model):
            produced = self.predict(model)
        choice_logprobs = None
        if isinstance(produced, Mapping):
            unknown = set(produced) - {"outputs", "choice_logprobs"}
            if unknown or not produced:
                raise ValueError(
                    f"task {self.name!r}: predict returned a mapping with keys {sorted(produced)}; "
                    "allowed are 'outputs' and 'choice_logprobs'"
                )
            choice_logprobs = _as_logprob_rows(self.name, produced.get("choice_logprobs"))
            outputs = produced.get("outputs")
            if outputs is None:
                if choice_logprobs is None:
                    raise ValueError(
                        f"task {self.name!r}: predict returned neither outputs nor choice_logprobs"
                    )
                outputs = [max(range(len(row)), key=row.__getitem__) for row in choice_logprobs]
        else:
            outputs = produced
        if isinstance(outputs, torch.Tensor):
            outputs = outputs.tolist()
        if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
            raise TypeError(
                f"task {self.name!r}: predict must return a sequence of outputs (one per example), "
                f"got {type(outputs).__name__}"
            )
        outputs = [plain_value(value) for value in outputs]
        if len(outputs) != len(self.targets):
            raise ValueError(
                f"task {self.name!r}: predict returned {len(outputs)} outputs "
                f"for {len(self.targets)} examples"
            )
        return TaskResult(
            outputs=outputs,
            correct=self.score(outputs),
            targets=list(self.targets),
            example_ids=list(self.example_ids),
            choice_logprobs=choice_logprobs,
        )

    def score(self, outputs: Sequence) -> list[float]:
        if len(outputs) != len(self.targets):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.targets)} targets")
        return [
            float(self._similarity(output, target))
            for output, target in zip(outputs, self.targets, strict=True)
        ]

    def __repr__(self) -> str:
        return f"FunctionTask(name={self.name!r}, examples={len(self.targets)}, metric={self.metric!r})"


def _as_logprob_rows(name: str, rows) -> list[list[float]] | None:
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    out = []
    for i, row in enumerate(rows):
        values = [float(v) for v in (row.tolist() if isinstance(row, torch.Tensor) else row)]
        if not values or any(math.isnan(v) for v in values):
            raise ValueError(f"task {name!r}: choice_logprobs[{i}] is empty or has NaN")
        out.append(values)
    return out
