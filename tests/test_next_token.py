"""NextTokenTask against independent computations: a float64 one-sequence-at-a-time argmax, hand-built
Hugging Face batches (and HF's own shifted loss), hand-counted votes and IS through the monitor, and two
ranks."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.tasks import Task
from checkpoint_stability.tasks.next_token import NextTokenTask

os.environ["HF_HUB_OFFLINE"] = "1"

LINES = list(dict.fromkeys(CORPUS))  # the six distinct sentences


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_tokenizer(), tiny_gpt2(0)


class Increment(torch.nn.Module):
    """Predicts "previous token + 1": every output is known by hand."""

    def __init__(self, vocab: int = 128):
        super().__init__()
        self.vocab = vocab
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()


def test_outputs_equal_a_float64_argmax_one_sequence_at_a_time(gpt2):
    tokenizer, model = gpt2
    sequences = [tokenizer.encode(line) for line in LINES] + [tokenizer.encode("Two plus"), [7, 3]]
    task = NextTokenTask("lm", sequences, batch_size=3)
    result = task.evaluate(model)
    reference = copy.deepcopy(model).double()
    outputs, targets, ids, margins = [], [], [], []
    for s, sequence in enumerate(sequences):
        with torch.no_grad():
            logits = reference(torch.tensor([sequence])).logits[0, :-1]
        top2 = logits.topk(2, dim=-1).values
        margins.extend((top2[:, 0] - top2[:, 1]).tolist())
        outputs.extend(logits.argmax(-1).tolist())
        targets.extend(sequence[1:])
        ids.extend(f"s{s}:t{t}" for t in range(len(sequence) - 1))
    print(f"\n{len(outputs)} positions, smallest float64 top-1/top-2 logit gap {min(margins):.2e}")
    assert result.outputs == outputs
    assert result.targets == targets
    assert result.example_ids == ids
    assert result.correct == [float(o == y) for o, y in zip(outputs, targets, strict=True)]
    assert result.score == pytest.approx(
        sum(o == y for o, y in zip(outputs, targets, strict=True)) / len(ids)
    )
    assert isinstance(task, Task) and task.kind == "next_token" and task.metric == "accuracy"
    # Tensors and numpy arrays are token sequences too; batch size changes nothing.
    as_arrays = [torch.tensor(sequences[0]), np.array(sequences[1]), *sequences[2:]]
    assert NextTokenTask("lm", as_arrays, batch_size=1).evaluate(model).outputs == outputs


def test_max_tokens_keeps_the_first_predicted_tokens_in_order():
    sequences = [[1, 2, 3, 4, 5], [10, 11, 13, 14], [20, 21, 22, 23, 24, 25], [1]]
    # 4 + 3 predicted tokens from the first two sequences, then 2 of the third; the 1-token sequence
    # after the cap is never read.
    task = NextTokenTask("cap", sequences, max_tokens=9)
    expected_ids = ["s0:t0", "s0:t1", "s0:t2", "s0:t3", "s1:t0", "s1:t1", "s1:t2", "s2:t0", "s2:t1"]
    assert task.example_ids == expected_ids
    assert task.targets == [2, 3, 4, 5, 11, 13, 14, 21, 22]
    result = task.evaluate(Increment())
    assert result.outputs == [2, 3, 4, 5, 11, 12, 14, 21, 22]
    assert result.correct == [1, 1, 1, 1, 1, 0, 1, 1, 1]
    assert result.score == pytest.approx(8 / 9)
    assert NextTokenTask("cap", sequences, max_tokens=1).example_ids == ["s0:t0"]

    read = []

    def stream():
        for sequence in sequences:
            read.append(sequence)
            yield sequence

    assert len(NextTokenTask("cap", stream(), max_tokens=7).targets) == 7
    assert len(read) == 2  # the cap was reached with the second sequence: nothing more was read


def hand_batches():
    """Two HF-style causal-LM batches, built by hand; the expected examples are spelled out below."""
    first = {
        "input_ids": torch.tensor(
            [
                [5, 6, 7, 8, 0, 0],  # right-padded
                [9, 10, 11, 12, 13, 14],
                [0, 0, 20, 21, 22, 23],  # left-padded
                [30, 31, 32, 33, 34, 35],  # no labels at all: skipped (its number, 3, is still used)
            ]
        ),
        "attention_mask": torch.tensor(
            [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
        ),
        "labels": torch.tensor(
            [
                [5, 6, 7, 8, -100, -100],
                [9, 10, -100, 99, 13, 14],  # 99: the label, not the next input, is the target
                [-100, -100, 20, 21, 22, 23],
                [-100] * 6,
            ]
        ),
    }
    second = {"input_ids": [[3, 4, 5]]}  # plain lists, no labels: the next input token is the target
    return [first, second]


def test_from_batches_shifts_labels_and_drops_ignored_positions():
    task = NextTokenTask.from_batches("hf", hand_batches())
    assert task.example_ids == [
        "s0:t0", "s0:t1", "s0:t2",
        "s1:t0", "s1:t2", "s1:t3", "s1:t4",
        "s2:t0", "s2:t1", "s2:t2",
        "s4:t0", "s4:t1",
    ]  # fmt: skip
    assert task.targets == [6, 7, 8, 10, 99, 13, 14, 21, 22, 23, 4, 5]
    result = task.evaluate(Increment())
    assert result.outputs == [6, 7, 8, 10, 12, 13, 14, 21, 22, 23, 4, 5]
    assert result.correct == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert result.score == pytest.approx(11 / 12)

    # The cap stops reading batches: the second one is never requested.
    def stream():
        yield hand_batches()[0]
        raise AssertionError("read past the cap")

    capped = NextTokenTask.from_batches("hf", stream(), max_tokens=5)
    assert capped.example_ids == ["s0:t0", "s0:t1", "s0:t2", "s1:t0", "s1:t2"]
    assert capped.targets == [6, 7, 8, 10, 99]


def test_from_batches_targets_are_the_ones_hugging_face_trains_on(gpt2):
    """HF's causal-LM loss over a right-padded batch equals the mean NLL of our (position, target) pairs."""
    _, model = gpt2
    batch = {key: value[:2] for key, value in hand_batches()[0].items()}  # the right-padded rows
    task = NextTokenTask.from_batches("hf", [batch])
    with torch.no_grad():
        output = model(**batch)
    logprobs = output.logits.double().log_softmax(-1)
    nll = []
    for example, target in zip(task.example_ids, task.targets, strict=True):
        row, position = (int(part[1:]) for part in example.split(":"))
        nll.append(-float(logprobs[row, position, target]))
    assert len(nll) == 7
    assert float(output.loss) == pytest.approx(math.fsum(nll) / len(nll), rel=1e-5)


def test_ensemble_votes_and_instability_through_the_monitor(gpt2, tmp_path):
    tokenizer, _ = gpt2
    model = tiny_gpt2(0)  # a copy of its own: its weights drift below
    sequences = [tokenizer.encode(line) for line in LINES]
    task = NextTokenTask("tokens", sequences, max_tokens=60)
    monitor = StabilityMonitor(
        [task], dirpath=tmp_path, window=3, every_n_steps=1, console=False, tensorboard=False
    )
    noise = torch.Generator().manual_seed(1)
    records = []
    for step in range(1, 5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.005 * torch.randn(parameter.shape, generator=noise))
        records += monitor.on_snapshot(model, step)
    monitor.close()

    raw = [line["outputs"] for line in monitor.history.outputs("tokens", variant="raw")]
    ens = monitor.history.outputs("tokens", variant="ens")
    assert len(raw) == len(ens) == 4 and len(raw[0]) == 60
    cases = Counter()
    for t, line in enumerate(ens):
        window = raw[max(0, t - 2) : t + 1]
        for i in range(60):
            votes = Counter(w[i] for w in window)
            top = max(votes.values())
            tied = [o for o, c in votes.items() if c == top]
            expected = next(w[i] for w in reversed(window) if w[i] in tied)
            if len(tied) > 1:
                cases["tie"] += 1
            elif expected != window[-1][i]:
                cases["majority over the newest"] += 1
            assert line["outputs"][i] == expected, (t, i)
        assert line["correct"] == [float(o == y) for o, y in zip(line["outputs"], task.targets, strict=True)]
    print(f"\nvote cases over 4 steps x 60 tokens: {dict(cases)}")
    assert cases["tie"] and cases["majority over the newest"]

    for variant in ("raw", "ens", "avg"):
        series = [line["outputs"] for line in monitor.history.outputs("tokens", variant=variant)]
        mine = [r for r in records if r["task"] == "tokens" and r["variant"] == variant]
        assert len(series) == len(mine) == 4
        for t, record in enumerate(mine):
            hits = [float(o == y) for o, y in zip(series[t], task.targets, strict=True)]
            assert record["score"] == pytest.approx(sum(hits) / 60, abs=1e-12)
            if t == 0:
                assert record["is"] is None
                continue
            flips = [sum(series[k][i] != series[k + 1][i] for k in range(t)) / t for i in range(60)]
            assert record["is"] == pytest.approx(sum(flips) / 60, abs=1e-12)
    meta = monitor.history.meta("tokens")
    assert meta["example_ids"] == task.example_ids and meta["targets"] == task.targets


class NotLogits(torch.nn.Module):
    def forward(self, input_ids):
        return input_ids.float()


@pytest.mark.parametrize(
    ("sequences", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "'bad'.*no sequences"),
        ([[1, 2], [3]], {}, ValueError, "'bad'.*sequence 1 has 1 token"),
        ([[1, 2], []], {}, ValueError, "'bad'.*sequence 1 has 0 token"),
        ([[1, 2]], {"max_tokens": 0}, ValueError, "'bad'.*max_tokens"),
        ([[1, 2]], {"batch_size": 0}, ValueError, "'bad'.*batch_size"),
        ([[1, 2]], {"pad_token_id": -1}, ValueError, "'bad'.*pad_token_id"),
        ([[1, 2], [3, 4.0]], {}, TypeError, "'bad'.*sequence 1 has 4.0 at position 1"),
        ([[1, True]], {}, TypeError, "'bad'.*sequence 0 has True"),
        ([[1, 2], torch.tensor([1.0, 2.0])], {}, TypeError, "'bad'.*sequence 1.*integer"),
        ([torch.tensor([[1, 2]])], {}, TypeError, "'bad'.*sequence 0.*1-d"),
        ([[1, -2]], {}, ValueError, "'bad'.*sequence 0 has the negative id -2"),
        ([[1, 2], "ab"], {}, TypeError, "'bad'.*sequence 1"),
        ("abc", {}, TypeError, "'bad'.*sequences"),
    ],
)
def test_bad_sequences(sequences, kwargs, error, match):
    with pytest.raises(error, match=match):
        NextTokenTask("bad", sequences, **kwargs)


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([{"labels": [[1, 2]]}], "'bad'.*batch 0.*input_ids"),
        ([{"input_ids": [[1, 2]]}, [1, 2]], "'bad'.*batch 1.*input_ids"),
        ([{"input_ids": [[1, 2, 3]], "labels": [[1, 2]]}], "'bad'.*batch 0 labels.*shape"),
        ([{"input_ids": [[1, 2, 3]], "attention_mask": [[1, 0, 1]]}], "'bad'.*batch 0 row 0.*gaps"),
        ([{"input_ids": [[1, 2, 3]], "labels": [[1, -5, 3]]}], "'bad'.*batch 0 row 0.*label -5"),
        ([{"input_ids": [[1, 2, 3]], "labels": [[-100, -100, -100]]}], "'bad'.*no sequences"),
        ([{"input_ids": [[1, 2, 3]], "attention_mask": [[0, 0, 0]]}], "'bad'.*no sequences"),
    ],
)
def test_bad_batches(batches, match):
    with pytest.raises(ValueError, match=match):
        NextTokenTask.from_batches("bad", batches)


def test_non_integer_batches_and_models_without_logits_are_type_errors():
    with pytest.raises(TypeError, match=r"'bad'.*batch 0 input_ids row 0.*integer"):
        NextTokenTask.from_batches("bad", [{"input_ids": torch.rand(2, 3)}])
    with pytest.raises(TypeError, match=r"'bad'.*batch 1 labels row 0 has 2.5"):
        NextTokenTask.from_batches(
            "bad", [{"input_ids": [[1, 2]]}, {"input_ids": [[1, 2]], "labels": [[1, 2.5]]}]
        )
    with pytest.raises(TypeError, match=r"'bad'.*batches"):
        NextTokenTask.from_batches("bad", {"input_ids": [[1, 2]]})
    with pytest.raises(TypeError, match=r"'bad'.*logits"):
        NextTokenTask("bad", [[1, 2, 3]]).evaluate(NotLogits())


# ------------------------------------------------------------------------------- two ranks (gloo)


class CollectiveLM(torch.nn.Module):
    """A small causal LM (running sums of embeddings) that joins a collective in every forward, as a
    sharded model does; counts its forward passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(40, 16)
        self.head = torch.nn.Linear(16, 40)
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(torch.zeros(1))
        return self.head(self.embed(input_ids).cumsum(dim=1))


SEQUENCES = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20]]


def rank_main(rank: int, out: Path) -> None:
    # A forked child must not enter OpenMP regions the parent's thread pool owned (as DataLoader workers).
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        model = CollectiveLM()
        result = NextTokenTask("dist", SEQUENCES, batch_size=2).evaluate(model)
        record = {"outputs": result.outputs, "ids": result.example_ids, "calls": model.calls}
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_sequences_and_gather_in_order(tmp_path):
    context = multiprocessing.get_context("fork")  # no interpreter start-up; a file store, no port
    processes = [context.Process(target=rank_main, args=(rank, tmp_path)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
            process.join()
    assert [p.exitcode for p in processes] == [0, 0], "a rank failed or hung; see its stderr"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = CollectiveLM()
    single = NextTokenTask("dist", SEQUENCES, batch_size=2).evaluate(model)
    with torch.no_grad():
        oracle = [int(model(torch.tensor([s]))[0, t].argmax()) for s in SEQUENCES for t in range(len(s) - 1)]
    assert single.outputs == oracle
    for rank in ranks:
        assert rank["outputs"] == single.outputs and rank["ids"] == single.example_ids
    # 5 sequences: 3 per rank (rank 1's third is a filler), 2 batches of 2 on each rank.
    assert ranks[0]["calls"] == ranks[1]["calls"] == 2


# ------------------------------------------------------------------------------- (inputs, targets) pairs


class SumOfBoth(torch.nn.Module):
    """Needs the targets: predicts (input + target) at every position, flattened like Lightning's demo."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, inputs, targets):
        self.seen.append(targets.clone())
        logits = torch.nn.functional.one_hot((inputs + targets) % self.vocab, self.vocab).float()
        return logits.view(-1, self.vocab)


def test_from_pairs_reads_targets_as_given_and_pads_them_like_the_inputs():
    pairs = [
        (
            torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]),
            torch.tensor([[2, 4, 3, -100, 10], [12, 1, 2, 3, 20]]),
        ),
        (torch.tensor([[0, 31, 32]]), torch.tensor([[5, 6, 7]])),
    ]
    task = NextTokenTask.from_pairs("pairs", pairs, batch_size=3, pad_token_id=7)
    # By hand: the output at t is inputs[t] + targets[t]; the target is targets[t] (no shift); -100 is
    # no example.
    expected_outputs = [3, 6, 6, 15, 18, 8, 10, 12, 30, 5, 37, 39]
    expected_targets = [2, 4, 3, 10, 12, 1, 2, 3, 20, 5, 6, 7]
    model = SumOfBoth()
    result = task.evaluate(model)
    assert result.outputs == expected_outputs
    assert result.targets == expected_targets
    assert result.example_ids == [
        *("s0:t0", "s0:t1", "s0:t2", "s0:t4"),
        *(f"s1:t{t}" for t in range(5)),
        *(f"s2:t{t}" for t in range(3)),
    ]
    assert result.correct == [0.0] * 9 + [1.0, 0.0, 0.0]
    # One forward for the three rows: the short row's targets right-padded with pad_token_id.
    (seen,) = model.seen
    assert seen.tolist() == [[2, 4, 3, -100, 10], [12, 1, 2, 3, 20], [5, 6, 7, 7, 7]]


def test_a_model_taking_only_the_inputs_is_called_with_them():
    pairs = [(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 5]]))]
    result = NextTokenTask.from_pairs("pairs", pairs).evaluate(Increment())
    assert result.outputs == [2, 3, 4] and result.correct == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        (
            [(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))],
            "batch 0 targets.*shape",
        ),
        ([(torch.ones(1, 3, dtype=torch.long),)], "batch 0 must be an \\(inputs, targets\\) pair"),
        ([(torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, -5]]))], "row 0 has the target -5"),
        ([(torch.ones(1, 2, dtype=torch.long), torch.full((1, 2), -100))], "no sequences"),
    ],
)
def test_bad_pairs(batches, match):
    with pytest.raises(ValueError, match=match):
        NextTokenTask.from_pairs("bad", batches)
