"""ClassificationTask against plain per-example computations, in the monitor, and on two ranks."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.tasks.classification import ClassificationTask

FEATURES, CLASSES = 5, 3


def make_data(n: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, CLASSES)
    )


def oracle(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """One example at a time, in eval mode: the predicted class and float64 log-softmax of its logits."""
    outputs, logprobs = [], []
    model.eval()
    with torch.no_grad():
        for row in x:
            logits = model(row.unsqueeze(0))[0]
            outputs.append(int(logits.argmax()))
            logprobs.append(torch.log_softmax(logits.double(), dim=0).tolist())
    model.train()
    return outputs, logprobs


class CountingDataset(Dataset):
    """A dataset that counts how often it is read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        self.reads += 1
        return self.x[index], self.y[index]


@pytest.mark.parametrize("form", ["pair", "tensor_dataset", "loader", "list_of_batches", "generator"])
def test_matches_a_per_example_oracle(form):
    x, y = make_data()
    data = {
        "pair": lambda: (x, y),
        "tensor_dataset": lambda: TensorDataset(x, y),
        "loader": lambda: DataLoader(TensorDataset(x, y), batch_size=6),
        "list_of_batches": lambda: [(x[i : i + 10], y[i : i + 10].tolist()) for i in range(0, len(y), 10)],
        "generator": lambda: ((x[i : i + 4], y[i : i + 4]) for i in range(0, len(y), 4)),
    }[form]()
    task = ClassificationTask("cls", data, batch_size=8)
    model = make_model()
    model.train()  # dropout on: the task must evaluate in eval mode and give the mode back
    result = task.evaluate(model)
    assert model.training and all(m.training for m in model.modules())
    outputs, logprobs = oracle(model, x)
    assert result.outputs == outputs
    assert result.targets == y.tolist()
    assert result.example_ids == list(range(len(y)))
    assert result.correct == [float(o == t) for o, t in zip(outputs, y.tolist(), strict=True)]
    assert result.score == pytest.approx(sum(result.correct) / len(y))
    assert all(isinstance(o, int) for o in result.outputs)
    for row, expected in zip(result.choice_logprobs, logprobs, strict=True):
        assert len(row) == CLASSES
        assert row == pytest.approx(expected, abs=1e-6)
        assert math.fsum(math.exp(v) for v in row) == pytest.approx(1.0, abs=1e-12)
    assert task.score([0] * len(y)) == [float(t == 0) for t in y.tolist()]
    assert task.kind == "classification" and task.metric == "accuracy"


def test_model_outputs_with_logits_or_tuples_and_an_input_transform():
    x, y = make_data(9)
    model = make_model()
    outputs, _ = oracle(model, x)

    class WithLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, batch):
            return SimpleNamespace(logits=self.inner(batch), loss=None)

    class AsTuple(WithLogits):
        def forward(self, batch):
            return (self.inner(batch), "hidden states")

    for wrapper in (WithLogits(), AsTuple()):
        assert ClassificationTask("cls", (x, y), batch_size=4).evaluate(wrapper).outputs == outputs

    seen = []

    def transform(batch):
        seen.append(batch.dtype)
        return batch.float()

    task = ClassificationTask("cls", (x.double(), y), batch_size=4, input_transform=transform)
    assert task.evaluate(model).outputs == outputs
    assert seen == [torch.float64] * 3


def test_a_shuffled_loader_is_read_once_and_gives_the_same_examples_every_time():
    x, y = make_data(40)
    dataset = CountingDataset(x, y)
    loader = DataLoader(dataset, batch_size=7, shuffle=True)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    task = ClassificationTask("cls", loader, batch_size=16)
    # Reading the loader drew its shuffle seed; the caller's streams are as they were.
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert dataset.reads == 40
    # The shuffled order is kept, and it is a permutation of the dataset.
    assert task.targets != y.tolist()
    order = [int(torch.nonzero((x == row).all(dim=1))[0]) for row in task.inputs]
    assert sorted(order) == list(range(40))
    assert task.targets == [int(y[i]) for i in order]

    model = make_model()
    first = task.evaluate(model)
    for _ in range(2):
        again = task.evaluate(model)
        assert again.outputs == first.outputs and again.targets == first.targets
        assert again.choice_logprobs == first.choice_logprobs
    assert dataset.reads == 40  # the loader is never read again
    assert first.outputs == oracle(model, x[order])[0]


def test_max_examples_keeps_the_first_ones_and_stops_reading():
    x, y = make_data(40)
    dataset = CountingDataset(x, y)
    task = ClassificationTask("cls", DataLoader(dataset, batch_size=5), max_examples=13)
    assert len(task) == 13 and task.targets == y[:13].tolist()
    assert torch.equal(task.inputs, x[:13])
    assert dataset.reads == 15  # three batches of five, not eight
    result = task.evaluate(make_model())
    assert len(result.outputs) == 13 and result.outputs == oracle(make_model(), x[:13])[0]
    assert len(ClassificationTask("cls", (x, y), max_examples=100)) == 40


def test_the_evaluation_set_is_a_copy():
    x, y = make_data(6)
    task = ClassificationTask("cls", (x, y))
    before = task.evaluate(make_model()).outputs
    x.add_(100.0)
    y.fill_(0)
    assert task.evaluate(make_model()).outputs == before


def test_bad_data_is_refused_with_the_task_and_the_batch():
    x, y = make_data(10)
    cases = [
        ([], ValueError, "'bad'.*no examples"),
        ((x[:0], y[:0]), ValueError, "no examples"),
        (DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4), ValueError, "no examples"),
        ((x, y.float()), TypeError, "batch 0: labels must be integer class ids"),
        ([(x[:5], y[:5]), (x[5:], y[5:] > 0)], TypeError, "batch 1: labels must be integer"),
        ([(x[:5], y[:5]), (x[5:], y[5:], y[5:])], TypeError, r"batch 1 must be an \(inputs, labels\) pair"),
        ([{"x": x, "y": y}], TypeError, "batch 0 must be an"),
        ([x], TypeError, "batch 0 must be an"),
        ([(x[:5], y[:5]), (x[5:], y[5:9])], ValueError, r"batch 1: labels of shape \(4,\) do not match"),
        ([(x, y.unsqueeze(1))], ValueError, r"batch 0: labels of shape \(10, 1\)"),
        (TensorDataset(x, y), None, None),
        (list(TensorDataset(x, y)), ValueError, "batch 0.*looks like one example"),
        ([(x[:5], y[:5]), (x[5:, :3], y[5:])], ValueError, "batch 1 has inputs of shape"),
        ([(x.tolist(), y)], TypeError, "batch 0: inputs must be a tensor"),
        ((x, y - 5), ValueError, "batch 0: labels must be class ids >= 0"),
        (TensorDataset(x, y, y), ValueError, "exactly two tensors"),
        (42, TypeError, "data must be a DataLoader"),
        ("text", TypeError, "data must be a DataLoader"),
    ]
    for data, error, message in cases:
        if error is None:
            ClassificationTask("bad", data)
            continue
        with pytest.raises(error, match=message):
            ClassificationTask("bad", data)
    for setting, value in (
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("max_examples", 0),
        ("max_examples", True),
    ):
        with pytest.raises(ValueError, match=setting):
            ClassificationTask("bad", (x, y), **{setting: value})
    with pytest.raises(TypeError, match="input_transform"):
        ClassificationTask("bad", (x, y), input_transform="float")
    with pytest.raises(ValueError, match="task name"):
        ClassificationTask("a/b", (x, y))


def test_a_distributed_sampler_is_refused():
    x, y = make_data(10)
    sampler = torch.utils.data.distributed.DistributedSampler(TensorDataset(x, y), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="DistributedSampler"):
        ClassificationTask("cls", DataLoader(TensorDataset(x, y), sampler=sampler))


def test_bad_model_outputs_name_the_task():
    x, y = make_data(10)
    task = ClassificationTask("cls", (x, y), batch_size=4)

    class Returns(torch.nn.Module):
        def __init__(self, make):
            super().__init__()
            self.make = make

        def forward(self, batch):
            return self.make(batch)

    for make in (
        lambda b: {"logits": torch.zeros(len(b), 3)},
        lambda b: torch.zeros(len(b)),
        lambda b: torch.zeros(len(b), 3, 2),
        lambda b: torch.zeros(len(b) + 1, 3),
        lambda b: "logits",
    ):
        with pytest.raises(TypeError, match=r"task 'cls'.*\(batch, classes\)"):
            task.evaluate(Returns(make))
    with pytest.raises(
        ValueError, match="task 'cls': example 0 has label 2, but the model gives logits for only 2"
    ):
        ClassificationTask("cls", (x[:1], torch.tensor([2]))).evaluate(
            Returns(lambda b: torch.zeros(len(b), 2))
        )

    def nan_in_the_last_batch(batch):
        logits = torch.zeros(len(batch), 3)
        if len(batch) == 2:  # the last batch of 4 + 4 + 2 holds examples 8 and 9
            logits[1, 0] = float("nan")
        return logits

    with pytest.raises(ValueError, match=r"task 'cls'.*example 9.*NaN"):
        task.evaluate(Returns(nan_in_the_last_batch))


def test_mean_prob_ensemble_in_the_monitor_matches_a_hand_mean(tmp_path):
    x, y = make_data(23)
    task = ClassificationTask("cls", DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True))
    monitor = StabilityMonitor(
        [task],
        dirpath=tmp_path,
        window=3,
        every_n_steps=1,
        ensemble="mean_prob",
        console=False,
        tensorboard=False,
    )
    model = make_model()
    generator = torch.Generator().manual_seed(1)
    for step in (1, 2, 3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.7)
        monitor.on_snapshot(model, step)
    monitor.close()
    raw = monitor.history.outputs("cls", variant="raw")
    ens = monitor.history.outputs("cls", variant="ens")
    assert [line["step"] for line in raw] == [line["step"] for line in ens] == [1, 2, 3]
    meta = monitor.history.meta("cls")
    assert meta["kind"] == "classification" and meta["targets"] == task.targets
    changed = 0
    for index, line in enumerate(ens):
        window = raw[max(0, index - 2) : index + 1]
        expected = []
        for example in range(len(y)):
            mean = [0.0] * CLASSES
            for snapshot in window:
                row = snapshot["choice_logprobs"][example]
                total = math.fsum(math.exp(v) for v in row)
                for c, v in enumerate(row):
                    mean[c] += math.exp(v) / total / len(window)
            expected.append(max(range(CLASSES), key=lambda c, mean=mean: (mean[c], -c)))
        assert line["outputs"] == expected
        assert line["correct"] == [float(o == t) for o, t in zip(expected, task.targets, strict=True)]
        changed += sum(a != b for a, b in zip(expected, raw[index]["outputs"], strict=True))
    assert changed > 0  # the perturbation makes the ensemble differ from the newest raw model somewhere


DISTRIBUTED_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from checkpoint_stability.tasks.classification import ClassificationTask

dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[1]
generator = torch.Generator().manual_seed(0)
x, y = torch.randn(11, 5, generator=generator), torch.randint(0, 3, (11,), generator=generator)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
calls = []
model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
result = ClassificationTask("cls", (x, y), batch_size=4).evaluate(model)
try:
    ClassificationTask("other", (x + rank, y)).evaluate(model)
    refused = None
except ValueError as error:
    refused = str(error)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"outputs": result.outputs, "logprobs": result.choice_logprobs, "targets": result.targets,
               "calls": calls, "refused": refused}, f)
dist.destroy_process_group()
"""


def test_two_ranks_split_the_examples_and_gather_them_in_order(tmp_path):
    script = tmp_path / "classify_ddp.py"
    script.write_text(textwrap.dedent(DISTRIBUTED_SCRIPT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    ranks = [json.loads(Path(tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    x, y = make_data_like_script()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    outputs, logprobs = oracle(model, x)
    for rank in ranks:
        assert rank["outputs"] == outputs and rank["targets"] == y.tolist()
        for row, expected in zip(rank["logprobs"], logprobs, strict=True):
            assert row == pytest.approx(expected, abs=1e-6)
        # 11 examples: equal padded shares of 6, each run as batches of 4 and 2 on both ranks.
        assert rank["calls"] == [4, 2]
        assert "ranks hold different evaluation sets" in rank["refused"]


def make_data_like_script() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(11, 5, generator=generator), torch.randint(0, 3, (11,), generator=generator)


class KeywordOnly(torch.nn.Module):
    """A model whose forward takes its inputs by keyword and returns a dict: it needs ``forward=``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *, features, scale=1.0):
        return {"scores": self.inner(features) * scale}


def test_forward_says_how_to_call_the_model():
    x, y = make_data()
    inner = make_model()
    task = ClassificationTask(
        "kw", (x, y), batch_size=8, forward=lambda model, inputs: model(features=inputs)["scores"]
    )
    outputs, logprobs = oracle(inner, x)
    result = task.evaluate(KeywordOnly(inner))
    assert result.outputs == outputs
    assert np.allclose(result.choice_logprobs, logprobs, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match=r"'kw'.*forward must be callable"):
        ClassificationTask("kw", (x, y), forward="model")  # type: ignore[arg-type]
