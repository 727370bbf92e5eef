"""MultipleChoiceTask against a plain unbatched float64 reference and against lm-evaluation-harness itself."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.tasks.base import Task
from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask

# Varied on purpose: different numbers of choices (one has a single choice), a context ending in
# whitespace (moved into the continuation), an empty context (conditioned on EOS), characters the
# tokenizer never saw, and continuations of very different lengths (so batches mix lengths).
EXAMPLES = [
    {"context": "The capital of France is", "choices": ["Paris", "Rome", "York"], "label": 0},
    {"context": "Two plus two is", "choices": ["four.", "five.", "seven.", "eight."], "label": 0},
    {"context": "To be, or not to be, that is the ", "choices": ["question.", "stage"], "label": 0},
    {
        "context": "The quick brown fox jumps over the",
        "choices": ["lazy dog.", "sun of York.", "men and women merely players.", "fox", "Paris"],
        "label": 1,
    },
    {"context": "Now is the winter of our", "choices": ["discontent"], "label": 0},
    {"context": "", "choices": ["All the world", "Ten minus three is seven."], "label": 1},
    {"context": "Zebra: qux?", "choices": ["xylophone!", "Qq", "é"], "label": 2},
    {"context": "All the world's a stage, and all the", "choices": ["men", "women", "players"], "label": 2},
]
# (few_shot_prefix, max_length): plain, and a prefix long enough that max_length cuts about half the
# inputs on the left (so truncated and whole inputs share batches).
SETTINGS = [("", None), ("Q: Three plus five is eight.\nA: yes\n\n", 40)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(0, tokenizer)


def reference_sums(model, tokenizer, prefix, max_length, delimiter=" "):
    """Per example and choice: (summed log-prob, continuation token count), one unpadded float64 pass each."""
    model64 = copy.deepcopy(model).double()
    out = []
    for example in EXAMPLES:
        context = prefix + example["context"]
        rows = []
        for choice in example["choices"]:
            continuation = delimiter + choice
            if context == "":
                context_ids = [tokenizer.eos_token_id]  # the tiny tokenizer has no BOS
                continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
                assert continuation_ids[0] != tokenizer.eos_token_id
            else:
                stripped = context.rstrip()
                moved = context[len(stripped) :] + continuation
                whole = tokenizer.encode(stripped + moved, add_special_tokens=False)
                context_ids = tokenizer.encode(stripped, add_special_tokens=False)
                assert whole[: len(context_ids)] == context_ids
                continuation_ids = whole[len(context_ids) :]
            sequence = context_ids + continuation_ids
            if max_length is not None:
                sequence = sequence[-(max_length + 1) :]
            inputs = sequence[:-1]
            with torch.no_grad():
                logprobs = model64(torch.tensor([inputs])).logits[0].log_softmax(-1)
            start = len(inputs) - len(continuation_ids)
            total = sum(logprobs[start + j, t].item() for j, t in enumerate(continuation_ids))
            rows.append((total, len(continuation_ids)))
        out.append(rows)
    return out


def argmax(row):
    return max(range(len(row)), key=lambda c: (row[c], -c))


@pytest.mark.parametrize("prefix,max_length", SETTINGS)
def test_matches_an_unbatched_float64_reference_for_every_normalization_and_batch_size(
    model, tokenizer, prefix, max_length
):
    sums = reference_sums(model, tokenizer, prefix, max_length)
    if max_length is not None:
        lengths = {
            len(tokenizer.encode(prefix + e["context"] + " " + c)) for e in EXAMPLES for c in e["choices"]
        }
        assert min(lengths) <= max_length + 1 < max(lengths), "some inputs should be truncated, some not"
    for normalize in ("none", "chars", "tokens"):
        expected = []
        for example, rows in zip(EXAMPLES, sums, strict=True):
            divisors = {
                "none": [1.0] * len(rows),
                "chars": [float(len(c)) for c in example["choices"]],  # lm-eval acc_norm: len(choice)
                "tokens": [float(n) for _, n in rows],
            }[normalize]
            expected.append([total / d for (total, _), d in zip(rows, divisors, strict=True)])
        results = []
        for batch_size in (1, 3, 64):
            task = MultipleChoiceTask(
                "mc",
                EXAMPLES,
                tokenizer,
                normalize=normalize,
                few_shot_prefix=prefix,
                batch_size=batch_size,
                max_length=max_length,
            )
            result = task.evaluate(model)
            for got, want in zip(result.choice_logprobs, expected, strict=True):
                assert got == pytest.approx(want, abs=1e-4, rel=0)
            assert result.outputs == [argmax(row) for row in expected]
            assert result.targets == [e["label"] for e in EXAMPLES]
            assert result.correct == [
                float(o == e["label"]) for o, e in zip(result.outputs, EXAMPLES, strict=True)
            ]
            assert result.example_ids == list(range(len(EXAMPLES)))
            results.append(result)
        # Batching changes nothing but float rounding: the same answers at every batch size.
        assert results[0].outputs == results[1].outputs == results[2].outputs
        for other in results[1:]:
            for a, b in zip(results[0].choice_logprobs, other.choice_logprobs, strict=True):
                assert a == pytest.approx(b, abs=1e-5, rel=0)


@pytest.mark.parametrize("prefix,max_length", SETTINGS)
def test_matches_lm_evaluation_harness_loglikelihood_acc_and_acc_norm(tokenizer, prefix, max_length):
    datasets = pytest.importorskip("datasets")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    ours = tiny_gpt2(0, tokenizer)  # HFLM may touch its model (eval(), tie_weights): give it its own
    theirs = tiny_gpt2(0, tokenizer)
    harness = HFLM(pretrained=theirs, tokenizer=tokenizer, batch_size=3, max_length=max_length)
    # lm-eval builds the requests itself from a multiple_choice task config (target_delimiter " ").
    docs = [dict(e) for e in EXAMPLES]
    lm_task = ConfigurableTask(
        config={
            "task": "mc_probe",
            "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }
    )
    requests = []
    for index, doc in enumerate(lm_task.test_docs()):
        requests.append(
            lm_task.construct_requests(doc, prefix + doc["context"], metadata=("mc_probe", index, 1))
        )
    flat = [instance for group in requests for instance in group]
    answers = harness.loglikelihood(flat, disable_tqdm=True)
    lls, position = [], 0
    for group in requests:
        lls.append(answers[position : position + len(group)])
        position += len(group)

    plain = MultipleChoiceTask("mc", EXAMPLES, tokenizer, few_shot_prefix=prefix, max_length=max_length)
    norm = MultipleChoiceTask(
        "mc", EXAMPLES, tokenizer, normalize="chars", few_shot_prefix=prefix, max_length=max_length
    )
    got, got_norm = plain.evaluate(ours), norm.evaluate(ours)
    for index, doc in enumerate(lm_task.test_docs()):
        assert got.choice_logprobs[index] == pytest.approx([ll for ll, _ in lls[index]], abs=1e-4, rel=0)
        # lm-eval's own prediction, read back from process_results by trying each choice as the gold.
        for candidate in range(len(doc["choices"])):
            metrics = lm_task.process_results({**doc, "label": candidate}, lls[index])
            assert metrics["acc"] == float(got.outputs[index] == candidate)
            assert metrics["acc_norm"] == float(got_norm.outputs[index] == candidate)


class NoPad:
    """A tokenizer without a pad token (one id per character)."""

    pad_token_id = None
    eos_token_id = 0

    def encode(self, text):
        return [ord(c) % 300 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


GOOD = {"context": "a b", "choices": ["c", "d"], "label": 0}


@pytest.mark.parametrize(
    "examples,settings,error,pattern",
    [
        ([], {}, ValueError, r"task 'mc': examples is empty"),
        ("abc", {}, TypeError, r"task 'mc': examples must be a list"),
        ([GOOD, ["a"]], {}, TypeError, r"task 'mc': example 1 must be a dict"),
        ([GOOD, {"context": "a", "choices": ["b"]}], {}, ValueError, r"task 'mc': example 1 has no 'label'"),
        ([{"choices": ["b"], "label": 0}], {}, ValueError, r"task 'mc': example 0 has no 'context'"),
        (
            [GOOD, GOOD, {"context": "a", "choices": [], "label": 0}],
            {},
            ValueError,
            r"example 2 has no choices",
        ),
        ([GOOD, {"context": "a", "choices": "bc", "label": 0}], {}, TypeError, r"example 1: choices must be"),
        ([GOOD, {"context": "a", "choices": ["b", 3], "label": 0}], {}, TypeError, r"example 1, choice 1"),
        ([GOOD, {"context": 5, "choices": ["b"], "label": 0}], {}, TypeError, r"example 1: context must"),
        (
            [GOOD, GOOD, {**GOOD, "label": 2}],
            {},
            ValueError,
            r"task 'mc': example 2: label 2 is out of range",
        ),
        ([{**GOOD, "label": -1}], {}, ValueError, r"task 'mc': example 0: label -1 is out of range"),
        ([GOOD, {**GOOD, "label": True}], {}, TypeError, r"task 'mc': example 1: label must be an integer"),
        (
            [GOOD, {"context": "a", "choices": ["b", ""], "label": 0}],
            {"target_delimiter": ""},
            ValueError,
            r"task 'mc': example 1, choice 1 \(''\) tokenizes to nothing",
        ),
        (
            [GOOD, {"context": "a", "choices": ["b", ""], "label": 0}],
            {"normalize": "chars"},
            ValueError,
            r"task 'mc': example 1, choice 1 is empty; normalize='chars'",
        ),
        (
            [GOOD, {**GOOD, "context": "  "}],
            {},
            ValueError,
            r"task 'mc': example 1 has a context of only white",
        ),
        (
            [GOOD, {**GOOD, "choices": ["Paris and Rome and York"]}],
            {"max_length": 3},
            ValueError,
            r"task 'mc': example 1, choice 0 has \d+ continuation tokens, more than max_length=3",
        ),
        ([GOOD], {"normalize": "bytes"}, ValueError, r"task 'mc': normalize must be one of"),
        ([GOOD], {"batch_size": 0}, ValueError, r"task 'mc': batch_size must be"),
        ([GOOD], {"max_length": 0}, ValueError, r"task 'mc': max_length must be"),
        ([GOOD], {"target_delimiter": None}, TypeError, r"task 'mc': target_delimiter must be a string"),
        ([GOOD, GOOD], {"example_ids": ["x", "x"]}, ValueError, r"task 'mc': example_ids are not unique"),
        ([GOOD, GOOD], {"example_ids": ["x"]}, ValueError, r"task 'mc': 1 example_ids for 2 examples"),
        ([GOOD], {"example_ids": [object()]}, ValueError, r"task 'mc': example id of example 0 is not JSON"),
    ],
)
def test_bad_inputs_name_the_task_and_the_example(tokenizer, examples, settings, error, pattern):
    with pytest.raises(error, match=pattern):
        MultipleChoiceTask("mc", examples, tokenizer, **settings)


def test_pad_token_is_required_unless_given(model):
    with pytest.raises(ValueError, match=r"task 'mc': the tokenizer has no pad token"):
        MultipleChoiceTask("mc", [GOOD], NoPad())
    task = MultipleChoiceTask("mc", [GOOD, {**GOOD, "label": 1}], NoPad(), pad_token_id=0)
    assert task.pad_token_id == 0
    assert task.evaluate(model).outputs[0] in (0, 1)
    with pytest.raises(TypeError, match=r"task 'mc': the tokenizer must have an encode"):
        MultipleChoiceTask("mc", [GOOD], object())
    with pytest.raises(ValueError, match="task name"):
        MultipleChoiceTask("", [GOOD], NoPad(), pad_token_id=0)


def test_empty_context_without_bos_or_eos_is_refused():
    class Bare(NoPad):
        eos_token_id = None

    with pytest.raises(ValueError, match=r"task 'mc': example 1 has an empty context"):
        MultipleChoiceTask("mc", [GOOD, {**GOOD, "context": ""}], Bare(), pad_token_id=0)


def test_a_model_that_does_not_return_logits_is_a_type_error(tokenizer):
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(len(tokenizer), 4)

        def forward(self, input_ids):
            return self.embedding(input_ids).sum(-1)  # (batch, length): not next-token logits

    task = MultipleChoiceTask("mc", [GOOD], tokenizer)
    with pytest.raises(TypeError, match=r"task 'mc': the model must return next-token logits"):
        task.evaluate(Pooled())


def test_protocol_score_and_no_side_effects_on_the_model(model, tokenizer):
    task = MultipleChoiceTask("mc", EXAMPLES, tokenizer, example_ids=[f"q{i}" for i in range(len(EXAMPLES))])
    assert isinstance(task, Task)
    assert (task.kind, task.metric) == ("multiple_choice", "accuracy")
    labels = [e["label"] for e in EXAMPLES]
    assert task.score(labels) == [1.0] * len(EXAMPLES)
    assert task.score([0] * len(EXAMPLES)) == [float(label == 0) for label in labels]
    with pytest.raises(ValueError, match=r"task 'mc': 2 outputs for 8 examples"):
        task.score([0, 0])
    # The caller owns train/eval mode and grad mode: evaluate changes neither, and records no graph.
    trained = tiny_gpt2(1, tokenizer).train()
    trained.transformer.h[0].eval()  # a mixed state must survive as it is
    modes = [m.training for m in trained.modules()]
    with torch.enable_grad():
        result = task.evaluate(trained)
        assert torch.is_grad_enabled()
    assert [m.training for m in trained.modules()] == modes
    assert all(p.grad is None for p in trained.parameters())
    assert result.example_ids == [f"q{i}" for i in range(len(EXAMPLES))]
    # One forward pass per batch of (example, choice) requests: ceil(requests / batch_size) calls.
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        MultipleChoiceTask("mc", EXAMPLES, tokenizer, batch_size=5).evaluate(model)
    finally:
        handle.remove()
    assert len(calls) == math.ceil(sum(len(e["choices"]) for e in EXAMPLES) / 5)


def test_mean_prob_ensemble_through_the_monitor(tmp_path, tokenizer):
    model = tiny_gpt2(2, tokenizer)
    task = MultipleChoiceTask("mc", EXAMPLES, tokenizer, normalize="tokens", batch_size=8)
    monitor = StabilityMonitor(
        [task],
        dirpath=tmp_path,
        window=3,
        every_n_steps=1,
        ensemble="mean_prob",
        console=False,
        tensorboard=False,
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        monitor.on_snapshot(model, step)
    monitor.close()
    raw = monitor.history.outputs("mc", variant="raw")
    ens = monitor.history.outputs("mc", variant="ens")
    assert [line["step"] for line in raw] == [line["step"] for line in ens] == [1, 2, 3, 4, 5]
    for index, line in enumerate(ens):
        window = raw[max(0, index - 2) : index + 1]
        expected = []
        for example, item in enumerate(EXAMPLES):
            mean = [0.0] * len(item["choices"])
            for snapshot in window:
                row = snapshot["choice_logprobs"][example]
                top = max(row)
                weights = [math.exp(v - top) for v in row]
                for choice, weight in enumerate(weights):
                    mean[choice] += weight / sum(weights) / len(window)
            expected.append(argmax(mean))
        assert line["outputs"] == expected
        assert line["correct"] == [float(o == e["label"]) for o, e in zip(expected, EXAMPLES, strict=True)]
    # The raw lines are what the task gives for the model (ragged rows survive the history intact).
    assert [len(row) for row in raw[-1]["choice_logprobs"]] == [len(e["choices"]) for e in EXAMPLES]
    final = task.evaluate(model)
    assert raw[-1]["outputs"] == final.outputs
    for got, want in zip(raw[-1]["choice_logprobs"], final.choice_logprobs, strict=True):
        assert got == pytest.approx(want, abs=1e-6, rel=0)
    # IS is recorded for every variant once two evaluations exist.
    for variant in ("raw", "avg", "ens"):
        records = monitor.history.records("mc", variant=variant)
        assert len(records) == 5
        assert records[0]["is"] is None
        assert all(isinstance(r["is"], float) and 0.0 <= r["is"] <= 1.0 for r in records[1:])
