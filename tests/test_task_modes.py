"""Every task evaluates in eval mode without gradients and gives the model back as it found it, whether
the monitor or a user calls ``evaluate``: a GPT-2 with dropout 0.5 left in train mode (one block kept in
eval on purpose) gives, twice, the result it gives in eval mode, and every flag is restored."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability.tasks import (
    ClassificationTask,
    FunctionTask,
    GenerationTask,
    MultipleChoiceTask,
    NextTokenTask,
)

os.environ["HF_HUB_OFFLINE"] = "1"
LM_EVAL_DATA = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def dropout_gpt2(tokenizer):
    """A 2-layer GPT-2 whose dropouts (0.5) would change nearly every output if left on."""
    return tiny_gpt2(0, tokenizer, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."]
seen_by_predict: list[tuple[bool, bool]] = []


def next_token(tokenizer):
    return NextTokenTask("next", [tokenizer.encode(s) for s in SENTENCES])


def classification(tokenizer):
    ids = torch.tensor([tokenizer.encode(s)[:8] for s in SENTENCES * 3])
    return ClassificationTask(
        "classes",
        (ids, torch.tensor([0, 1, 2, 3, 4, 5])),
        forward=lambda model, inputs: model(inputs).logits[:, -1, :10],
    )


def multiple_choice(tokenizer):
    examples = [
        {"context": "The capital of France is", "choices": ["Paris", "Rome", "York"], "label": 0},
        {"context": "Two plus two is", "choices": ["four", "seven"], "label": 0},
    ]
    return MultipleChoiceTask("choices", examples, tokenizer)


def generation(tokenizer):
    examples = [
        {"prompt": "The capital of Italy is", "answer": "Rome"},
        {"prompt": "To be, or", "answer": "not"},
    ]
    return GenerationTask("generate", examples, tokenizer, max_new_tokens=4)


def function(tokenizer):
    ids = torch.tensor([tokenizer.encode(SENTENCES[0])])

    def predict(model):
        seen_by_predict.append((model.training, torch.is_grad_enabled()))
        return model(ids).logits[0].argmax(-1).tolist()

    return FunctionTask("function", predict, targets=[0] * ids.shape[1])


BUILDERS = [next_token, classification, multiple_choice, generation, function]


def comparable(result):
    return result.outputs, result.correct, result.choice_logprobs


def check_modes_restored(build, tokenizer):
    task = build(tokenizer)
    model = dropout_gpt2(tokenizer)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = comparable(task.evaluate(reference))

    model.train()
    model.transformer.h[1].eval()  # kept in eval on purpose: a blanket train() afterwards would be wrong
    flags = {name: module.training for name, module in model.named_modules()}
    assert not all(flags.values()) and any(flags.values())
    for _ in range(2):
        assert comparable(task.evaluate(model)) == expected
        assert {name: module.training for name, module in model.named_modules()} == flags
        assert torch.is_grad_enabled()
    with torch.no_grad():  # and grad mode off stays off
        task.evaluate(model)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert {name: module.training for name, module in model.named_modules()} == flags


@pytest.mark.parametrize("build", BUILDERS, ids=[b.__name__ for b in BUILDERS])
def test_every_task_evaluates_in_eval_mode_and_restores_the_model(build, tokenizer):
    seen_by_predict.clear()
    check_modes_restored(build, tokenizer)
    if build is function:
        # predict ran in eval mode without gradients, also when called with the model in train mode.
        assert set(seen_by_predict) == {(False, False)}


def test_lm_eval_task_evaluates_in_eval_mode_and_restores_the_model(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    include = tmp_path / "tasks"
    include.mkdir()
    for path in LM_EVAL_DATA.glob("*.yaml"):
        (include / path.name).write_text(
            path.read_text().replace("__DATA_DIR__", str(LM_EVAL_DATA.resolve()))
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
        import datasets.config

        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
        patch.setattr(socket.socket, "connect", _refuse_remote(socket.socket.connect))
        from checkpoint_stability.tasks import LmEvalTask

        def lm_eval(tokenizer):
            return LmEvalTask("mc", "cs_mc", tokenizer=tokenizer, include_path=include, limit=4)

        check_modes_restored(lm_eval, tokenizer)


def _refuse_remote(connect):
    def guarded(self, address, *args, **kwargs):
        if self.family == socket.AF_UNIX or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1")
        ):
            return connect(self, address, *args, **kwargs)
        raise AssertionError(f"network access attempted: {address!r}")

    return guarded
