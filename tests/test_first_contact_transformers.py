"""First contact with a real ``transformers.Trainer`` as ``run_clm.py`` uses it (``trainer.add_callback``
after construction, the default progress bar): a mistyped ``metric_for_best_model`` raises at train start,
the stability values are in the evaluation's printed line and in ``log_history``, the default task's size
is stated and can match the Trainer's own ``eval_accuracy``, a fresh run never replaces an old one, and the
best model loads from the run directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lm import tiny_gpt2, token_blocks
from transformers import Trainer, TrainerCallback, TrainingArguments

from checkpoint_stability import ExistingRunError, NextTokenTask
from checkpoint_stability.callbacks.transformers import StabilityCallback

BLOCK = 16


def blocks(start: int, count: int) -> list[dict]:
    return token_blocks(start, count, BLOCK)


TRAIN, EVAL = blocks(0, 48), blocks(48, 8)
EVAL_TOKENS = len(EVAL) * (BLOCK - 1)  # every position but the last predicts a token


def preprocess_logits_for_metrics(logits, labels):
    return logits.argmax(dim=-1)  # as run_clm.py does


def compute_metrics(evaluation):
    # run_clm.py's metric: token accuracy of preds[:, :-1] against labels[:, 1:].
    predictions, labels = evaluation
    labels, predictions = labels[:, 1:].reshape(-1), predictions[:, :-1].reshape(-1)
    return {"accuracy": float(np.mean(predictions == labels))}


class Steps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def make_trainer(output_dir: Path, stability: StabilityCallback | None, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=100,
        seed=0,
        learning_rate=0.1,
    )
    settings.update(overrides)
    trainer = Trainer(
        model=tiny_gpt2(0),
        args=TrainingArguments(**settings),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    if stability is not None:
        trainer.add_callback(stability)  # the one-line edit a user makes to run_clm.py
    return trainer


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("metric", "closest", "settings"),
    [
        ("stability/mean/average/score", "stability/mean/avg/score", {}),
        ("eval_stability/valdation/avg/score", "stability/validation/avg/score", {}),
        ("stability/mean/avg/scor", "stability/mean/avg/score", {}),
        ("stability/mean/ens/score", "stability/mean/raw/score", {"ensemble": None}),
    ],
)
def test_a_metric_for_best_model_naming_no_stability_value_raises_at_train_start(
    tmp_path, metric, closest, settings
):
    steps = Steps()
    trainer = make_trainer(
        tmp_path,
        StabilityCallback(window=2, every_n_steps=2, console=False, **settings),
        metric_for_best_model=metric,
        load_best_model_at_end=True,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.add_callback(steps)
    with pytest.raises(ValueError, match="names no value this callback logs") as raised:
        trainer.train()
    assert f"the closest are {closest}" in str(raised.value)
    if settings.get("ensemble", "vote") is None:
        assert "(ens is off: ensemble=None)" in str(raised.value)
    assert steps.steps == []  # refused before the first training step


def test_a_valid_stability_metric_for_best_model_picks_a_checkpoint(tmp_path):
    trainer = make_trainer(
        tmp_path,
        StabilityCallback(window=2, every_n_steps=2, console=False),
        metric_for_best_model="stability/mean/avg/score",
        load_best_model_at_end=True,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    avg = {
        r["step"]: r["score"]
        for r in records(tmp_path / "stability")
        if (r.get("task"), r.get("variant")) == ("mean", "avg")
    }
    assert trainer.state.best_metric == max(avg.values())
    assert trainer.state.best_model_checkpoint is not None


def test_stability_values_are_in_the_printed_eval_line_and_in_log_history(tmp_path, capsys):
    trainer = make_trainer(tmp_path, StabilityCallback(window=2, every_n_steps=2))
    trainer.train()
    history = {
        (r["task"], r["variant"], r["step"]): r for r in records(tmp_path / "stability") if "score" in r
    }
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        for variant in ("raw", "avg", "ens"):
            expected = history[("validation", variant, entry["step"])]["score"]
            assert entry[f"eval_stability/validation/{variant}/score"] == expected
        assert entry["eval_stability/mean/avg/score"] == history[("mean", "avg", entry["step"])]["score"]
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if "'eval_loss'" in line]
    assert len(printed) == 2 and all("'eval_stability/mean/avg/score'" in line for line in printed)
    # The stability lines stand on their own lines, never glued onto the tqdm bar.
    assert all(line.startswith("[stability]") for line in out.splitlines() if "[stability]" in line)
    assert any(
        line.startswith("[stability] run ended at step 4 after 2 snapshots") for line in out.splitlines()
    )


def test_the_default_task_states_its_size_and_can_equal_the_trainers_eval_accuracy(tmp_path, capsys):
    # default_task_size covering every evaluation token: the same tokens as the Trainer's own metric.
    trainer = make_trainer(tmp_path, StabilityCallback(window=2, every_n_steps=2, default_task_size=10**6))
    trainer.train()
    out = capsys.readouterr().out
    assert (
        f"[stability] default task 'validation': next-token accuracy on the first {EVAL_TOKENS:,} of "
        f"{EVAL_TOKENS:,} tokens of the Trainer's eval_dataset" in out
    )
    raw = {
        r["step"]: r["score"]
        for r in records(tmp_path / "stability")
        if (r.get("task"), r.get("variant")) == ("validation", "raw")
    }
    trainers = {e["step"]: e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e}
    assert sorted(raw) == sorted(trainers) == [2, 4]
    assert raw == pytest.approx(trainers, abs=1e-12)

    # The default size: the first 50 tokens only, and the line says so.
    make_trainer(
        tmp_path / "capped", StabilityCallback(window=2, every_n_steps=2, default_task_size=50)
    ).train()
    assert (
        f"next-token accuracy on the first 50 of {EVAL_TOKENS:,} tokens of the Trainer's eval_dataset"
        in capsys.readouterr().out
    )


def test_a_fresh_run_into_an_old_output_dir_is_refused_and_leaves_every_file_as_it_was(tmp_path):
    make_trainer(tmp_path, StabilityCallback(window=2, every_n_steps=2, console=False)).train()
    run = tmp_path / "stability"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock.json"}
    assert (run / "best.json").exists() and len(before) > 5
    steps = Steps()
    again = make_trainer(tmp_path, StabilityCallback(window=2, every_n_steps=2, console=False))
    again.add_callback(steps)
    with pytest.raises(ExistingRunError) as raised:
        again.train()
    message = str(raised.value)
    assert f"the run directory {run} holds another run's results" in message
    assert "history.jsonl with 12 records up to step 4" in message and "overwrite=True" in message
    assert steps.steps == []
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock.json"}
    assert after == before


def test_the_callback_loads_the_best_model_from_its_dirpath_without_running(tmp_path):
    run = tmp_path / "stability"
    make_trainer(tmp_path, StabilityCallback(window=2, every_n_steps=2, console=False)).train()
    best = json.loads((run / "best.json").read_text())
    reader = StabilityCallback(dirpath=run)  # another script, later: nothing has run here
    assert reader.best == best and reader.best_model_path == run / best["path"]
    model = tiny_gpt2(seed=7)
    assert reader.load_best(model) == best
    task = NextTokenTask.from_batches(
        "validation", [{"input_ids": torch.stack([b["input_ids"] for b in EVAL])}]
    )
    assert task.evaluate(model).score == pytest.approx(best["score"], abs=1e-12)
    with pytest.raises(FileNotFoundError, match="has no dirpath="):
        StabilityCallback().load_best(model)
