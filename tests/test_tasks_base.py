"""The Task protocol, TaskResult and FunctionTask; the evaluation isolation context."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.tasks import FunctionTask, Task, TaskResult, validate_tasks


def test_function_task_with_outputs_scores_exact_match():
    task = FunctionTask("t", lambda model: torch.tensor([2, 0, 1]), targets=[2, 1, 1])
    assert isinstance(task, Task)
    result = task.evaluate(torch.nn.Identity())
    assert result.outputs == [2, 0, 1]
    assert result.correct == [1.0, 0.0, 1.0]
    assert result.score == pytest.approx(2 / 3)
    assert result.example_ids == [0, 1, 2]
    assert result.choice_logprobs is None


def test_function_task_from_choice_logprobs_takes_the_argmax():
    rows = [[-1.0, -0.5, -3.0], [-0.1, -2.0, -2.0], [-5.0, -5.0, -0.2]]
    task = FunctionTask(
        "mc", lambda model: {"choice_logprobs": rows}, targets=[1, 1, 2], kind="multiple_choice"
    )
    result = task.evaluate(torch.nn.Identity())
    assert result.outputs == [1, 0, 2]
    assert result.correct == [1.0, 0.0, 1.0]
    assert result.choice_logprobs == rows
    # score() re-scores any outputs against the task's own targets (how ensembles are scored).
    assert task.score([1, 1, 0]) == [1.0, 1.0, 0.0]


def test_function_task_char_f1():
    task = FunctionTask("gen", lambda model: ["abc", "x"], targets=["abd", "x"], metric="char_f1")
    result = task.evaluate(torch.nn.Identity())
    # {a, b, c} vs {a, b, d}: overlap 2, precision = recall = 2/3.
    assert result.correct == pytest.approx([2 / 3, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mean"}, "reserved"),
        ({"name": "a/b"}, "not allowed"),
        ({"name": ""}, "non-empty"),
        ({"targets": []}, "empty"),
        ({"metric": "bleu"}, "metric"),
        ({"example_ids": [1, 1]}, "unique"),
        ({"example_ids": [1]}, "example_ids"),
        ({"targets": [object(), 1]}, "JSON"),
    ],
)
def test_function_task_bad_construction(kwargs, match):
    arguments = {"name": "t", "predict": lambda m: [0, 0], "targets": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        FunctionTask(**arguments)


@pytest.mark.parametrize(
    ("produced", "error", "match"),
    [
        ([0], ValueError, "1 outputs for 2"),
        ("ab", TypeError, "sequence"),
        ({"logits": [[0.0]]}, ValueError, "allowed"),
        ({"choice_logprobs": [[0.0], [float("nan")]]}, ValueError, "NaN"),
    ],
)
def test_function_task_bad_predictions(produced, error, match):
    task = FunctionTask("t", lambda m: produced, targets=[0, 1])
    with pytest.raises(error, match=match):
        task.evaluate(torch.nn.Identity())


def test_task_result_validation():
    with pytest.raises(ValueError, match="correct has 1"):
        TaskResult(outputs=[0, 1], correct=[1.0], targets=[0, 1], example_ids=[0, 1])
    with pytest.raises(ValueError, match=r"correct\[1\]"):
        TaskResult(outputs=[0, 1], correct=[1.0, 1.5], targets=[0, 1], example_ids=[0, 1])
    with pytest.raises(ValueError, match="no examples"):
        TaskResult(outputs=[], correct=[], targets=[], example_ids=[])


def test_validate_tasks():
    task = FunctionTask("t", lambda m: [0], targets=[0])
    assert validate_tasks([task]) == [task]
    with pytest.raises(ValueError, match="list"):
        validate_tasks(task)
    with pytest.raises(ValueError, match="FunctionTask"):
        validate_tasks([lambda m: 0])


def test_isolated_evaluation_restores_rng_modes_and_grad():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a submodule kept in eval on purpose must stay so
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with isolated_evaluation(model):
        assert not model.training and not model[0].training
        assert not torch.is_grad_enabled()
        torch.rand(100), random.random(), np.random.rand(7)
    after = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0])
    assert after[1] == expected[1] and after[2] == expected[2]
    assert model.training and model[0].training and model[1].training and not model[2].training
    assert torch.is_grad_enabled()


def test_isolated_evaluation_restores_even_when_the_evaluation_raises():
    model = torch.nn.Linear(2, 2)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError), isolated_evaluation(model):
        torch.rand(10)
        raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
