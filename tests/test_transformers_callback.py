"""The Hugging Face Trainer adapter on a real ``transformers.Trainer`` with a tiny random GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard_runs import assert_runs_match, expected_runs, read_runs
from tiny_lm import tiny_gpt2, tiny_tokenizer, token_blocks
from transformers import Trainer, TrainerCallback, TrainingArguments

from checkpoint_stability import NextTokenTask
from checkpoint_stability.callbacks.transformers import StabilityCallback

BLOCK = 16


def blocks(start: int, count: int) -> list[dict]:
    return token_blocks(start, count, BLOCK)


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
    runs = read_runs(tmp_path / "runs" / "stability")
    assert sorted(runs) == ["avg", "best", "ens", "raw"]
    assert_runs_match(
        runs, expected_runs(records, window=callback.config.window, drift=callback.monitor.history.drift())
    )


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
    # Same buffer: the same snapshot steps, holding the same weights.
    whole_steps = manifest_steps(tmp_path / "whole" / "stability")
    split_steps = manifest_steps(tmp_path / "split" / "stability")
    assert whole_steps == split_steps == [6, 8]
    for step in whole_steps:
        name = f"buffer/step-{step:08d}.safetensors"
        a = load_file(tmp_path / "whole" / "stability" / name)
        b = load_file(tmp_path / "split" / "stability" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_final_weights_bit_identical_with_and_without(tmp_path):
    # 48 training blocks in batches of 4: 12 steps an epoch, so 14 steps cross an epoch boundary (a new
    # shuffle), and GPT-2's dropout draws from torch's generator at every step.
    assert tiny_gpt2(0).config.resid_pdrop > 0
    plain = train(tmp_path / "plain", max_steps=14).model
    callback = stability()
    watched_trainer = train(tmp_path / "watched", [callback], max_steps=14)
    watched = watched_trainer.model
    assert watched_trainer.state.epoch > 1
    assert sorted({r["step"] for r in callback.monitor.history.records()}) == [2, 4, 6, 8, 10, 12, 14]
    plain_state, watched_state = plain.state_dict(), watched.state_dict()
    assert plain_state.keys() == watched_state.keys()
    for name in plain_state:
        assert torch.equal(plain_state[name], watched_state[name]), name


def test_no_eval_dataset_names_tasks(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(0), args=arguments(tmp_path), train_dataset=TRAIN, callbacks=[stability()]
    )
    with pytest.raises(ValueError, match="tasks"):
        trainer.train()


class RaiseAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


def manifest_steps(dirpath) -> list[int]:
    """The buffer's snapshot steps, after checking that the manifest and the files agree."""
    manifest = json.loads((dirpath / "buffer" / "manifest.json").read_text())
    files = sorted(path.name for path in (dirpath / "buffer").glob("step-*.safetensors"))
    assert sorted(entry["file"] for entry in manifest["snapshots"]) == files
    for name in files:
        with safe_open(str(dirpath / "buffer" / name), framework="pt") as handle:
            assert len(list(handle.keys())) > 0
    return sorted(entry["step"] for entry in manifest["snapshots"])


def test_a_failed_train_keeps_its_records_and_the_next_train_resumes(tmp_path):
    callback = stability()
    common = dict(max_steps=8, save_strategy="steps", save_steps=4)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tmp_path, [callback, RaiseAt(5)], **common)
    dirpath = tmp_path / "stability"
    steps = sorted(
        {json.loads(line)["step"] for line in (dirpath / "history.jsonl").read_text().splitlines()}
    )
    assert steps == [2, 4]
    assert manifest_steps(dirpath) == [2, 4]

    # The same callback object runs again: it closes the run the exception left open, then resumes.
    train(tmp_path, [callback], resume=str(tmp_path / "checkpoint-4"), **common)
    keys = [(r["step"], r["task"], r["variant"], r["window"]) for r in callback.monitor.history.records()]
    assert len(keys) == len(set(keys))
    assert sorted({key[0] for key in keys}) == [2, 4, 6, 8]
    assert manifest_steps(dirpath) == [6, 8]


def test_every_n_steps_beyond_max_steps_warns(tmp_path):
    callback = stability(every_n_steps=10)
    with pytest.warns(UserWarning, match=r"every_n_steps=10.*ends at optimizer step 6.*no snapshot"):
        train(tmp_path, [callback])
    assert callback.monitor.history.records() == []


def test_unwritable_dirpath_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    callback = stability(dirpath=str(blocker / "stability"))
    with pytest.warns(UserWarning, match=r"cannot use the run directory.*a-file"):
        trainer = train(tmp_path / "out", [callback])
    assert trainer.state.global_step == 6
    with pytest.raises(RuntimeError, match=r"cannot use the run directory.*on_error='raise'"):
        train(tmp_path / "strict", [stability(dirpath=str(blocker / "stability"), on_error="raise")])


class ResizeEmbeddingsAt(TrainerCallback):
    """A model that changes shape mid-run, as when tokens are added to the vocabulary."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.resize_token_embeddings(model.config.vocab_size + 8)


def test_a_state_dict_that_changes_shape_restarts_the_window_with_a_message(tmp_path, caplog):
    callback = stability()
    # The resize comes after the stability callback's step-3 turn and before its step-4 snapshot.
    with caplog.at_level("WARNING", logger="checkpoint_stability"):
        # Plain SGD: Adam's state would keep the old shape (transformers resizes the Parameter in place).
        train(tmp_path, [callback, ResizeEmbeddingsAt(3)], optim="sgd")
    message = next(r.getMessage() for r in caplog.records if "restarting the window" in r.getMessage())
    assert "transformer.wte.weight" in message and "restarting the window from step 4" in message
    models = {r["step"]: r["n_models"] for r in callback.monitor.history.records() if r["variant"] == "avg"}
    assert models == {2: 1, 4: 1, 6: 2}
    assert manifest_steps(tmp_path / "stability") == [4, 6]


def test_restore_callback_states_from_checkpoint(tmp_path):
    common = dict(
        max_steps=8, save_strategy="steps", save_steps=4, restore_callback_states_from_checkpoint=True
    )
    # tasks=None: the rebuilt copy keeps the settings and builds its default task again.
    train(tmp_path / "default", [stability(), StopAt(4)], **common)
    trainer = train(
        tmp_path / "default", [stability()], resume=str(tmp_path / "default" / "checkpoint-4"), **common
    )
    (restored,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, StabilityCallback)]
    assert restored.config.window == 2 and restored.config.every_n_steps == 2
    assert sorted({r["step"] for r in restored.monitor.history.records()}) == [2, 4, 6, 8]

    task = NextTokenTask.from_batches(
        "held_out", [{"input_ids": torch.stack([b["input_ids"] for b in EVAL])}]
    )
    train(tmp_path / "given", [stability(tasks=[task]), StopAt(4)], **common)
    with pytest.raises(ValueError, match="cannot hold its tasks"):
        train(
            tmp_path / "given",
            [stability(tasks=[task])],
            resume=str(tmp_path / "given" / "checkpoint-4"),
            **common,
        )


def test_language_model_tasks_name_a_missing_tokenizer():
    from checkpoint_stability.tasks import GenerationTask, MultipleChoiceTask

    with pytest.raises(TypeError, match=r"tokenizer must have an encode.*got NoneType"):
        MultipleChoiceTask("cloze", [{"context": "a", "choices": ["b", "c"], "label": 0}], None)
    with pytest.raises(TypeError, match=r"tokenizer must have encode.*got NoneType"):
        GenerationTask("answer", [{"prompt": "a", "target": "b"}], None)


class RecordWeights(TrainerCallback):
    """The live weights at every step, copied: an oracle for the averages that owes nothing to the buffer."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_best_export_is_a_save_pretrained_directory_that_scores_what_the_history_says(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = NextTokenTask.from_batches(
        "held_out", [{"input_ids": torch.stack([b["input_ids"] for b in EVAL])}]
    )
    callback, weights = stability(tasks=[task]), RecordWeights()
    trainer = Trainer(
        model=tiny_gpt2(0),
        args=arguments(tmp_path),
        train_dataset=TRAIN,
        processing_class=tiny_tokenizer(),
        callbacks=[callback, weights],
    )
    trainer.train()
    best, path = callback.best, callback.best_model_path
    assert best["variant"] == "avg" and path.name == f"step-{best['step']:08d}-avg"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}

    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    assert task.evaluate(reloaded).score == pytest.approx(best["scores"]["held_out"], abs=1e-9)
    assert AutoTokenizer.from_pretrained(path)("To be")["input_ids"] == tiny_tokenizer()("To be")["input_ids"]

    # The export is the float64 mean of the live weights at the window's steps.
    snapshots = [weights.at[s] for s in best["steps"]]
    for name, value in reloaded.state_dict().items():
        mean = sum(s[name].double() for s in snapshots) / len(snapshots)
        torch.testing.assert_close(value.double(), mean.to(value.dtype).double(), rtol=0, atol=1e-6)

    # load_best fills a fresh model the same way.
    fresh = tiny_gpt2(1)
    callback.load_best(fresh)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
