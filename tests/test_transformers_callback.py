"""The Hugging Face Trainer adapter on a real ``transformers.Trainer`` with a tiny random GPT-2."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from checkpoint_stability import NextTokenTask
from checkpoint_stability.callbacks.transformers import StabilityCallback
from checkpoint_stability.sinks.base import scalar_items

BLOCK = 16


def blocks(start: int, count: int) -> list[dict]:
    ids = tiny_tokenizer()(" ".join(CORPUS))["input_ids"]
    out = []
    for i in range(start, start + count):
        chunk = torch.tensor(ids[i * BLOCK : (i + 1) * BLOCK])
        out.append({"input_ids": chunk, "labels": chunk.clone()})
    return out


TRAIN = blocks(0, 48)
EVAL = blocks(48, 8)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(tmp_path, callbacks=(), resume=None, **overrides) -> Trainer:
    trainer = Trainer(
        model=tiny_gpt2(0),
        args=arguments(tmp_path, **overrides),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def stability(**settings) -> StabilityCallback:
    return StabilityCallback(**{"window": 2, "every_n_steps": 2, "console": False, **settings})


def series(callback: StabilityCallback) -> list[tuple]:
    return sorted(
        (r["step"], r["task"], r["variant"], r["window"], r["score"])
        for r in callback.monitor.history.records()
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_snapshots_at_optimizer_steps_and_tensorboard(tmp_path, accumulation):
    callback = stability()
    train(tmp_path, [callback], gradient_accumulation_steps=accumulation, report_to=["tensorboard"])
    records = callback.monitor.history.records()
    assert sorted({r["step"] for r in records}) == [2, 4, 6]
    assert isinstance(callback.monitor.tasks[0], NextTokenTask)
    at_6 = {(r["task"], r["variant"]) for r in records if r["step"] == 6}
    assert {("validation", "raw"), ("validation", "avg"), ("validation", "ens")} <= at_6
    assert callback.best_model_path is not None and callback.best_model_path.exists()

    assert not (tmp_path / "stability" / "tensorboard").exists()
    events = EventAccumulator(str(tmp_path / "runs" / "stability"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for step in (2, 4, 6):
        expected = scalar_items([r for r in records if r["step"] == step])
        for name, value in expected.items():
            assert name in tags
            points = {e.step: e.value for e in events.Scalars(name)}
            assert points[step] == pytest.approx(value, rel=1e-6)


def test_best_model_on_a_stability_metric(tmp_path):
    callback = stability()
    trainer = train(
        tmp_path,
        [callback],
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="stability/mean/avg/score",
    )
    records = callback.monitor.history.records()
    # The value each evaluation saw: the latest mean/avg record at that step (the full window when there).
    seen = {}
    for r in sorted(records, key=lambda r: (r["step"], r["window"])):
        if r["task"] == "mean" and r["variant"] == "avg":
            seen[r["step"]] = r["score"]
    assert sorted(seen) in ([2, 4, 6], [4, 6])
    assert trainer.state.best_metric == pytest.approx(max(seen.values()))

    with pytest.raises(ValueError, match="multiple of every_n_steps"):
        train(
            tmp_path / "bad",
            [stability()],
            eval_strategy="steps",
            eval_steps=3,
            metric_for_best_model="stability/mean/avg/score",
        )


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_matches_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=8, save_strategy="steps", save_steps=4)
    whole = stability()
    train(tmp_path / "whole", [whole], **common)

    first = stability()
    train(tmp_path / "split", [first, StopAt(4)], **common)
    assert sorted({r["step"] for r in first.monitor.history.records()}) == [2, 4]
    second = stability(dirpath=str(tmp_path / "ignored"))
    train(tmp_path / "split", [second], resume=str(tmp_path / "split" / "checkpoint-4"), **common)

    # The directory saved in the checkpoint wins over dirpath=.
    assert second.monitor.dirpath == (tmp_path / "split" / "stability").resolve()
    assert not (tmp_path / "ignored").exists()
    got, want = series(second), series(whole)
    assert [row[:4] for row in got] == [row[:4] for row in want]  # same steps, none twice
    assert [row[4] for row in got] == pytest.approx([row[4] for row in want], abs=1e-6)


def test_final_weights_bit_identical_with_and_without(tmp_path):
    plain = train(tmp_path / "plain").model.state_dict()
    watched = train(tmp_path / "watched", [stability()]).model.state_dict()
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name


def test_no_eval_dataset_names_tasks(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(0), args=arguments(tmp_path), train_dataset=TRAIN, callbacks=[stability()]
    )
    with pytest.raises(ValueError, match="tasks"):
        trainer.train()
