"""Background evaluation under the real Lightning and Hugging Face Trainers: the training side only
snapshots, the evaluator writes, line for line, what the inline callback writes."""

from __future__ import annotations

import json

import pytest
from test_background import assert_same_results
from tiny_training import classify_task, make_data

from checkpoint_stability import NextTokenTask
from checkpoint_stability.evaluator import BackgroundEvaluator


def test_lightning_background_equals_inline(tmp_path):
    from test_lightning_callback import Classifier, fit

    from checkpoint_stability.callbacks.lightning import StabilityCallback

    x, y = make_data(0)
    settings = {"window": 2, "every_n_steps": 2, "console": False}
    fit(tmp_path / "inline", [StabilityCallback([classify_task(x, y)], **settings)], max_steps=12)
    background = StabilityCallback(evaluation="background", max_pending=10, **settings)  # no tasks needed
    fit(tmp_path / "bg", [background], max_steps=12)
    assert not (tmp_path / "bg" / "stability" / "history.jsonl").exists()
    result = BackgroundEvaluator(tmp_path / "bg" / "stability", [classify_task(x, y)], Classifier()).run(
        timeout=0
    )
    assert result.evaluated == [2, 4, 6, 8, 10, 12] and result.closed
    assert_same_results(tmp_path / "inline" / "stability", tmp_path / "bg" / "stability")


def test_transformers_background_equals_inline(tmp_path):
    from test_transformers_callback import EVAL, train
    from tiny_lm import tiny_gpt2

    from checkpoint_stability.callbacks.transformers import StabilityCallback

    def task():
        return NextTokenTask("cls", [block["input_ids"] for block in EVAL])

    settings = {"window": 2, "every_n_steps": 2, "console": False}
    train(tmp_path / "inline", [StabilityCallback([task()], **settings)])
    train(tmp_path / "bg", [StabilityCallback(evaluation="background", max_pending=10, **settings)])
    result = BackgroundEvaluator(tmp_path / "bg" / "stability", [task()], tiny_gpt2(0)).run(timeout=0)
    assert result.evaluated == [2, 4, 6] and result.closed
    assert_same_results(tmp_path / "inline" / "stability", tmp_path / "bg" / "stability")
    run = json.loads((tmp_path / "bg" / "stability" / "run.json").read_text())
    assert run["evaluation"] == "background" and run["closed"]


def test_the_trainer_cannot_select_on_values_computed_elsewhere(tmp_path):
    from test_transformers_callback import train

    from checkpoint_stability.callbacks.transformers import StabilityCallback

    callback = StabilityCallback(window=2, every_n_steps=2, console=False, evaluation="background")
    with pytest.raises(ValueError, match="with evaluation='background' those are computed by the evaluator"):
        train(
            tmp_path,
            [callback],
            eval_strategy="steps",
            eval_steps=2,
            metric_for_best_model="stability/mean/avg/score",
        )
