"""Default tasks for the batch shapes language models use, against plain loops written out here: the
argmax of the model's logits compared with the targets by hand, Lightning's demo transformer called the
way its own training step calls it, descriptions spelled out, and the fix each refusal shows."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from checkpoint_stability.tasks import ClassificationTask, NextTokenTask, task_from_dataloader
from checkpoint_stability.tasks.from_dataloader import default_task_fix, default_task_from_dataloader

VOCAB = 50
BLOCK = 35


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CausalLM(torch.nn.Module):
    """Running sums of embeddings: a causal LM whose forward takes the inputs only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(VOCAB, 16)
            self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).cumsum(dim=1))


class Blocks(Dataset):
    """Built as Lightning's demo ``WikiText2.__getitem__`` builds its items, from a token tensor."""

    def __init__(self, data: torch.Tensor, block_size: int = BLOCK):
        self.data, self.block_size = data, block_size

    def __len__(self) -> int:
        return len(self.data) // self.block_size - 1

    def __getitem__(self, index: int):
        start = index * self.block_size
        end = start + self.block_size
        return self.data[start:end], self.data[start + 1 : end + 1]


def tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def hand_loop(model, loader, logits_of):
    """(outputs, targets) of every (inputs, targets) batch, position by position, in order."""
    outputs, targets = [], []
    model.eval()
    with torch.no_grad():
        for inputs, target in loader:
            predicted = logits_of(model, inputs, target).argmax(-1)
            for row in range(len(inputs)):
                for t in range(inputs.shape[1]):
                    outputs.append(int(predicted[row, t]))
                    targets.append(int(target[row, t]))
    return outputs, targets


def test_token_pairs_are_next_token_targets_not_classes():
    model = CausalLM()
    loader = DataLoader(Blocks(tokens(12 * BLOCK + 1)), batch_size=4)
    task = default_task_from_dataloader(loader, max_examples=10_000)
    assert isinstance(task, NextTokenTask) and task.pairs
    outputs, targets = hand_loop(model, loader, lambda m, x, y: m(x))
    result = task.evaluate(model)
    assert result.outputs == outputs
    assert result.targets == targets
    assert result.score == pytest.approx(sum(o == y for o, y in zip(outputs, targets, strict=True)) / 385)
    assert len(targets) == 11 * BLOCK
    # Capped mid-sequence: the first 100 positions in order, and the model still sees whole rows.
    capped = default_task_from_dataloader(loader, max_examples=100).evaluate(model)
    assert capped.outputs == outputs[:100] and capped.targets == targets[:100]
    assert capped.example_ids[-1] == "s2:t29"


def test_bare_input_ids_tensors_predict_the_next_input():
    model = CausalLM()
    ids = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(ids, batch_size=4)  # a tensor dataset: batches are bare (batch, seq) tensors
    assert isinstance(next(iter(loader)), torch.Tensor)
    outputs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            predicted = model(batch).argmax(-1)
            for row in range(len(batch)):
                outputs += [int(predicted[row, t]) for t in range(8)]
                targets += [int(batch[row, t + 1]) for t in range(8)]
    task = default_task_from_dataloader(loader)
    result = task.evaluate(model)
    assert (result.outputs, result.targets) == (outputs, targets)
    assert result.correct == [float(o == y) for o, y in zip(outputs, targets, strict=True)]
    assert task.description == "next-token accuracy on the first 48 of 48 tokens of the validation data"
    # The dict holding only input_ids is the same task.
    as_dicts = default_task_from_dataloader([{"input_ids": batch} for batch in loader])
    assert as_dicts.evaluate(model).outputs == outputs


def small_transformer(seed: int = 0):
    from lightning.pytorch.demos.transformer import Transformer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=16, nlayers=1)


def wikitext_like(tmp_path, words: int = 400):
    """Lightning's own WikiText2 dataset, on a local file of random words (no download)."""
    from lightning.pytorch.demos.transformer import WikiText2

    rng = random.Random(5)
    vocabulary = [f"w{k}" for k in range(VOCAB - 1)]  # with "<eos>", VOCAB words
    lines = [" ".join(rng.choice(vocabulary) for _ in range(40)) for _ in range(words // 40)]
    (tmp_path / "wikitext-2.txt").write_text("\n".join(lines) + "\n")
    dataset = WikiText2(data_dir=tmp_path, download=False)
    assert dataset.vocab_size <= VOCAB
    return dataset


@pytest.mark.parametrize("wrapped", [False, True], ids=["Transformer", "LightningTransformer"])
def test_lightning_demo_transformer_is_called_with_inputs_and_targets(tmp_path, wrapped):
    from lightning.pytorch.demos.transformer import LightningTransformer

    model: torch.nn.Module = small_transformer()
    if wrapped:
        module = LightningTransformer(vocab_size=VOCAB)
        module.model = model
        model = module
    # Batches of 8, the task's own batch size: Lightning 2.4's demo adds the positional encoding of a
    # row's index in its batch, so there the logits depend on how rows are batched.
    loader = DataLoader(wikitext_like(tmp_path), batch_size=8)
    task = default_task_from_dataloader(loader, source="the val_dataloader")
    model.train()  # as a callback finds it mid-training: dropout must not reach the evaluation

    # The oracle calls the model as LightningTransformer.training_step does: self(inputs, target).
    def oracle(m, inputs, target):
        return m(inputs, target).view(inputs.shape[0], inputs.shape[1], -1)

    result = task.evaluate(model)
    assert model.training and all(m.training for m in model.modules())
    outputs, targets = hand_loop(model, loader, oracle)
    assert result.outputs == outputs and result.targets == targets
    assert result.score == pytest.approx(
        sum(o == y for o, y in zip(outputs, targets, strict=True)) / len(outputs)
    )
    assert task.origin == "built by tasks=None from the val_dataloader"
    assert task.description == (
        f"next-token accuracy on the first {len(outputs)} of {len(outputs)} tokens of the val_dataloader, "
        "(inputs, targets) batches: calls model(inputs, targets) if the model's forward requires 2 "
        "positional arguments, else model(inputs)"
    )
    # The same through forward=, taking the flattened (batch * seq, vocab) logits as they come.
    explicit = task_from_dataloader(loader, forward=lambda m, inputs, targets: m(inputs, targets))
    assert explicit.evaluate(model).outputs == outputs
    assert explicit.description.endswith("(inputs, targets) batches: calls forward(model, inputs, targets)")


def test_forward_returning_a_wrong_shape_names_both_shapes_once():
    model = CausalLM()
    calls = []

    def forward(m, inputs, targets):
        calls.append(inputs.shape)
        return m(inputs)[:, :-1]  # one position short

    loader = DataLoader(Blocks(tokens(10 * BLOCK + 1)), batch_size=2)
    task = task_from_dataloader(loader, forward=forward)
    with pytest.raises(ValueError, match=r"\(batch, seq, vocab\) = \(8, 35, V\).*got shape \(8, 34, 50\)"):
        task.evaluate(model)
    assert len(calls) == 1  # the first batch told; no batch after it ran

    ids_task = task_from_dataloader(
        [{"input_ids": torch.ones(2, 5, dtype=torch.long)}], forward=lambda m, ids, mask: m(ids).sum(-1)
    )
    # The last input token predicts nothing, so the model is given the first 4.
    with pytest.raises(
        ValueError, match=r"forward\(model, input_ids, attention_mask\).*\(2, 4, V\).*\(2, 4\)$"
    ):
        ids_task.evaluate(model)


class Unsized:
    """An iterable without len(): the total cannot be known without reading it all."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_descriptions_count_the_whole_loader_when_it_has_a_length():
    pairs = DataLoader(Blocks(tokens(300 * BLOCK + 1)), batch_size=16, shuffle=True)
    before = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    task = default_task_from_dataloader(pairs, max_examples=2048, source="eval_dataset")
    after = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    assert task.description.startswith(
        "next-token accuracy on the first 2,048 of 10,465 tokens of eval_dataset,"
    )
    assert 299 * BLOCK == 10_465

    x, y = torch.randn(512, 3), torch.randint(0, 4, (512,))
    classes = default_task_from_dataloader(DataLoader(TensorDataset(x, y), batch_size=100), max_examples=600)
    assert (
        classes.description
        == "classification accuracy on the first 512 of 512 examples of the validation data"
    )
    assert classes.origin == "built by tasks=None from the validation data"

    unsized = Unsized([{"input_ids": torch.ones(4, 600, dtype=torch.long)}] * 3)
    lm = task_from_dataloader(unsized)
    assert lm.description == "next-token accuracy on the first 2,048 tokens of the validation data"
    assert lm.origin == "built by task_from_dataloader from the validation data"
    # An unsized iterable read to its end during the build is counted after all.
    short = task_from_dataloader(Unsized([{"input_ids": torch.ones(1, 2, dtype=torch.long)}]))
    assert short.description == "next-token accuracy on the first 1 of 1 token of the validation data"


def test_the_counted_total_is_what_an_uncapped_task_holds():
    # Padding both sides, ignored labels, a row without targets, plain lists: the tensor count used for
    # the description agrees with the examples the task itself collects when nothing is cut.
    batches = [
        {
            "input_ids": torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [0, 0, 20, 21, 22, 23]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]),
            "labels": torch.tensor([[5, 6, 7, 8, -100, -100], [9, 10, -100, 99, 13, 14], [-100] * 6]),
        },
        {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1]])},
        {"input_ids": [[1, 2, 3, 4]], "labels": [[1, -100, 3, 4]]},
    ]
    whole = NextTokenTask.from_batches("whole", batches, max_tokens=10_000)
    capped = default_task_from_dataloader(batches, max_examples=2)
    assert capped.description == (
        f"next-token accuracy on the first 2 of {len(whole.targets)} tokens of the validation data"
    )
    assert len(whole.targets) == 3 + 4 + 1 + 2


@pytest.mark.parametrize(
    ("batch", "match", "fix"),
    [
        (
            (torch.zeros(2, 3), torch.zeros(2), torch.zeros(2)),
            "tuple of 3",
            "task_from_dataloader(((batch[0], batch[1]) for batch in val_loader), "
            "forward=lambda model, inputs: model(inputs))",
        ),
        (
            (torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7)),
            "tuple of 3",
            "task_from_dataloader(((batch[0], batch[1]) for batch in val_loader), "
            "forward=lambda model, inputs, targets: model(inputs, targets))",
        ),
        (
            {"pixels": torch.zeros(2, 3), "label": torch.zeros(2, dtype=torch.long)},
            "without 'input_ids'",
            'task_from_dataloader(((batch["pixels"], batch["label"]) for batch in val_loader), '
            "forward=lambda model, inputs: model(inputs))",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)},
            "sequence classification",
            'task_from_dataloader(((batch["input_ids"], batch["labels"]) for batch in val_loader), '
            "forward=lambda model, inputs: model(input_ids=inputs))",
        ),
        (
            torch.zeros(2, 3),
            "Tensor of torch.float32",
            "task_from_dataloader(val_loader, forward=lambda model, inputs, targets: model(inputs, targets))",
        ),
    ],
)
def test_refusals_end_with_a_snippet_that_replaces_the_task(batch, match, fix):
    with pytest.raises(ValueError, match=match) as caught:
        default_task_from_dataloader([batch])
    message = str(caught.value)
    snippet = f"from checkpoint_stability.tasks import task_from_dataloader\nStabilityCallback(tasks=[{fix}])"
    assert message.endswith(f"Pass tasks=[...] instead, for example:\n{snippet}")
    assert default_task_fix(None, caught.value) == snippet


def test_the_fix_for_a_task_that_fails_at_its_first_evaluation_fits_its_batches():
    head = (
        "from checkpoint_stability.tasks import task_from_dataloader\n"
        "StabilityCallback(tasks=[task_from_dataloader"
    )
    pairs = default_task_from_dataloader([(torch.ones(1, 3, dtype=torch.long),) * 2])
    ids = default_task_from_dataloader([{"input_ids": torch.ones(1, 3, dtype=torch.long)}])
    classes = default_task_from_dataloader([(torch.ones(2, 3), torch.tensor([0, 1]))])
    assert isinstance(classes, ClassificationTask)
    error = RuntimeError("forward() missing 1 required positional argument")
    assert default_task_fix(pairs, error) == (
        f"{head}(val_loader, forward=lambda model, inputs, targets: model(inputs, targets))])"
    )
    assert default_task_fix(ids, None) == (
        f"{head}(val_loader, forward=lambda model, input_ids, attention_mask: "
        "model(input_ids, attention_mask=attention_mask))])"
    )
    assert (
        default_task_fix(classes, error)
        == f"{head}(val_loader, forward=lambda model, inputs: model(inputs))])"
    )
    assert default_task_fix(None, None) == default_task_fix(pairs, None)


def test_the_fixes_run():
    # The snippets are code: run the pairs one on a loader and a model that need it.
    model = small_transformer()
    loader = DataLoader(Blocks(tokens(4 * BLOCK + 1)), batch_size=2)
    snippet = default_task_fix(None, None)
    built = []
    namespace = {"val_loader": loader, "StabilityCallback": lambda tasks: built.extend(tasks)}
    exec(snippet, namespace)
    (task,) = built
    expected = default_task_from_dataloader(loader).evaluate(model).outputs
    assert task.evaluate(model).outputs == expected


def test_a_tensor_dataset_of_input_ids_is_a_next_token_task():
    # TensorDataset(ids) yields [ids] batches: the one tensor is the batch of input_ids.
    from torch.utils.data import DataLoader, TensorDataset

    from checkpoint_stability.tasks.from_dataloader import default_task_from_dataloader

    ids = torch.randint(0, 20, (5, 7))
    task = default_task_from_dataloader(DataLoader(TensorDataset(ids), batch_size=2))
    assert task.targets == ids[:, 1:].reshape(-1).tolist()
    assert task.description == "next-token accuracy on the first 30 of 30 tokens of the validation data"
