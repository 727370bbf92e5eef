"""ClassificationTask: accuracy of a model that maps an input batch to class logits (not a language model)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from checkpoint_stability.isolation import isolated_evaluation, preserved_rng
from checkpoint_stability.runtime import default_runtime
from checkpoint_stability.tasks.base import TaskResult, validate_task_name
from checkpoint_stability.tasks.progress import progress
from checkpoint_stability.tasks.sharding import gather_in_order, shard_examples
from checkpoint_stability.validation import require_int


class ClassificationTask:
    """Accuracy of a classifier, with per-class log-probabilities for the ``mean_prob`` ensemble.

    ``data`` is a ``DataLoader`` (or any re-iterable) of ``(inputs, labels)`` batches, a
    ``(inputs, labels)`` pair of tensors, or a ``TensorDataset`` of those two tensors. ``labels`` are
    integer class ids, one per row of ``inputs``. The model maps a batch of inputs to logits of shape
    ``(batch, classes)`` (an output with ``.logits``, or a tuple whose first entry is the logits, works
    too). Per example, the output is the predicted class (the argmax of the logits, ties to the lowest
    id), the score 1 if it equals the label, and ``choice_logprobs`` the row's ``log_softmax``.

    The evaluation set is read once, at construction, into CPU tensors (at most ``max_examples``
    rows). Instability scores and window ensembles compare each example's outputs across snapshots,
    so every snapshot must see the same examples in the same order; a shuffling ``DataLoader``, or one
    with random augmentation, would give different ones at every pass. Reading it does not advance the
    caller's random number generators (python, numpy, torch), so training sees the same random stream
    with or without this task. The set is kept in memory: use ``max_examples`` for a large one.

    Under ``torch.distributed`` every rank must hold the same evaluation set (pass a loader without a
    ``DistributedSampler``; the first evaluation checks it): the examples are split across ranks in
    equal padded shares and gathered back in order. Every rank must call :meth:`evaluate`.

    The model is called as ``model(inputs)``, or as ``forward(model, inputs)`` when a ``forward`` is
    given (a model whose ``forward`` needs more than the inputs). It is put in eval mode and run without
    gradients; every submodule's train/eval flag, the grad mode and the random generators are restored
    after.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks.classification import ClassificationTask
        >>> inputs = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 2.0]])
        >>> task = ClassificationTask("toy", (inputs, torch.tensor([0, 1, 0])), batch_size=2)
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> result = task.evaluate(model)
        >>> result.outputs, result.correct, result.score
        ([0, 1, 1], [1.0, 1.0, 0.0], 0.6666666666666666)
        >>> [round(p, 3) for p in result.choice_logprobs[0]]
        [-0.127, -2.127]
    """

    kind = "classification"
    metric = "accuracy"
    origin: str | None = None
    """Who built the task from what, e.g. ``"built by tasks=None from the validation data"`` (set by
    :func:`~checkpoint_stability.tasks.task_from_dataloader`; ``None`` for a task built directly)."""
    description: str | None = None
    """What the task measures on how much of which data, e.g. ``"next-token accuracy on the first 2,048
    of 10,240 tokens of the validation data"`` (set with ``origin``)."""

    def __init__(
        self,
        name: str,
        data: DataLoader | Iterable | tuple[torch.Tensor, torch.Tensor] | TensorDataset,
        *,
        batch_size: int = 64,
        max_examples: int | None = None,
        input_transform: Callable[[torch.Tensor], Any] | None = None,
        show_progress: bool = True,
        forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    ):
        """
        Args:
            name: the task's name in logged keys and file names.
            data: the evaluation set: a ``DataLoader`` or re-iterable of ``(inputs, labels)`` batches,
                an ``(inputs, labels)`` pair of tensors, or a ``TensorDataset`` of two tensors. Read once.
            batch_size: examples per forward pass at evaluation (independent of the loader's own).
            max_examples: keep only the first ``max_examples`` examples; ``None`` keeps all.
            input_transform: called on each batch of inputs (already on the model's device) before the
                forward pass; the model is called with what it returns (e.g. a dtype cast, normalisation).
            show_progress: a progress bar on rank 0 for evaluations longer than a couple of seconds.
            forward: ``forward(model, inputs) -> logits`` called instead of ``model(inputs)`` (after
                ``input_transform``), e.g. ``lambda model, inputs: model(pixel_values=inputs).logits``.
        """
        self.name = validate_task_name(name)
        where = f"task {name!r}"
        batch_size = require_int("batch_size", batch_size, 1, where=where)
        max_examples = require_int("max_examples", max_examples, 1, optional=True, where=where)
        if input_transform is not None and not callable(input_transform):
            raise TypeError(
                f"{where}: input_transform must be callable, got {type(input_transform).__name__}"
            )
        if forward is not None and not callable(forward):
            raise TypeError(f"{where}: forward must be callable, got {type(forward).__name__}")
        self.forward = forward
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.input_transform = input_transform
        self.show_progress = show_progress
        self.inputs, self.labels = _materialise(where, data, max_examples)
        self.targets: list[int] = self.labels.tolist()
        self.example_ids: list[int] = list(range(len(self.targets)))
        self._checked_across_ranks = False

    def __len__(self) -> int:
        return len(self.targets)

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        if not self._checked_across_ranks:
            self._check_same_data_on_every_rank()
        shard = shard_examples(len(self.targets))
        device = _model_device(model)
        indices = torch.tensor(shard.indices, dtype=torch.long)
        local: list[tuple[int, list[float]]] = []
        starts = range(0, shard.size, self.batch_size)
        with isolated_evaluation(model), progress(len(starts), self.name, enabled=self.show_progress) as bar:
            for start in starts:
                rows = indices[start : start + self.batch_size]
                local.extend(self._predict(model, self.inputs[rows].to(device), shard.indices, start))
                bar.update(1)
        gathered = gather_in_order(local, shard)
        outputs = [output for output, _ in gathered]
        for index, (_, row) in enumerate(gathered):
            if self.targets[index] >= len(row):
                raise ValueError(
                    f"task {self.name!r}: example {index} has label {self.targets[index]}, but the model "
                    f"gives logits for only {len(row)} classes"
                )
        return TaskResult(
            outputs=outputs,
            correct=self.score(outputs),
            targets=list(self.targets),
            example_ids=list(self.example_ids),
            choice_logprobs=[row for _, row in gathered],
        )

    def _predict(
        self, model: torch.nn.Module, inputs: torch.Tensor, indices: list[int], start: int
    ) -> list[tuple[int, list[float]]]:
        """(predicted class, log-probability row) of each example of one batch."""
        batch = self.input_transform(inputs) if self.input_transform is not None else inputs
        output = self.forward(model, batch) if self.forward is not None else model(batch)
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(inputs):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(output).__name__
            raise TypeError(
                f"task {self.name!r}: the model must return logits of shape (batch, classes) = "
                f"({len(inputs)}, C), an output with .logits, or a tuple whose first entry is them; got {got}"
            )
        if logits.shape[1] < 1:
            raise TypeError(f"task {self.name!r}: the model returned logits for 0 classes")
        # float64 so an example's log-probabilities do not depend on the batch it landed in.
        logprobs = logits.detach().double().log_softmax(dim=-1).cpu()
        bad = torch.isnan(logprobs).any(dim=-1)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"task {self.name!r}: the model's logits for example {indices[start + row]} give NaN "
                "log-probabilities (NaN or infinite logits)"
            )
        predicted = logits.detach().argmax(dim=-1).cpu().tolist()
        return list(zip(predicted, logprobs.tolist(), strict=True))

    def score(self, outputs: Sequence) -> list[float]:
        if len(outputs) != len(self.targets):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.targets)} examples")
        return [
            1.0 if output == target else 0.0 for output, target in zip(outputs, self.targets, strict=True)
        ]

    def _check_same_data_on_every_rank(self) -> None:
        """Refuse different evaluation sets on different ranks: sharding would mix examples silently."""
        runtime = default_runtime()
        if runtime.world_size > 1:
            digest = hashlib.sha256()
            for tensor in (self.inputs, self.labels):
                digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            if len(set(runtime.all_gather_object(digest.hexdigest()))) > 1:
                raise ValueError(
                    f"task {self.name!r}: the ranks hold different evaluation sets (a DistributedSampler, "
                    "or data that differs per process); every rank must read the same examples, which "
                    "the task then splits across ranks itself"
                )
        self._checked_across_ranks = True

    def __repr__(self) -> str:
        return (
            f"ClassificationTask(name={self.name!r}, examples={len(self.targets)}, "
            f"batch_size={self.batch_size})"
        )


def _materialise(where: str, data: Any, max_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` as CPU tensors, read once and without touching the caller's RNG streams."""
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(
                f"{where}: a TensorDataset must hold exactly two tensors (inputs, labels), "
                f"it holds {len(data.tensors)}"
            )
        data = tuple(data.tensors)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        batches: Iterable = [data]
    elif isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{where}: data must be a DataLoader or iterable of (inputs, labels) batches, an "
            f"(inputs, labels) pair of tensors, or a TensorDataset; got {type(data).__name__}"
        )
    else:
        if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
            raise ValueError(
                f"{where}: the DataLoader uses a DistributedSampler, so each rank would read a different "
                "part of the data; pass a loader without it: the task splits the examples across ranks"
            )
        batches = data

    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    count = 0
    # Iterating a DataLoader draws from torch's global generator (the shuffle seed) and datasets may
    # draw from python's or numpy's: put them back so training takes the same random path as without us.
    with preserved_rng(cuda=False):
        for number, batch in enumerate(batches):
            x, y = _check_batch(where, number, batch)
            if max_examples is not None:
                x, y = x[: max_examples - count], y[: max_examples - count]
            if inputs and x.shape[1:] != inputs[0].shape[1:]:
                raise ValueError(
                    f"{where}: batch {number} has inputs of shape {tuple(x.shape)}, but earlier "
                    f"batches have rows of shape {tuple(inputs[0].shape[1:])}; every example must "
                    "have the same shape"
                )
            inputs.append(x.detach().cpu())
            labels.append(y.detach().cpu().long())
            count += len(y)
            if max_examples is not None and count >= max_examples:
                break  # the rest would be thrown away: do not read it
    if count == 0:
        raise ValueError(f"{where}: data holds no examples; a task needs at least one")
    # torch.cat copies even a single batch, so later changes to the caller's tensors cannot reach us.
    return torch.cat(inputs), torch.cat(labels)


def _check_batch(where: str, number: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise TypeError(f"{where}: batch {number} must be an (inputs, labels) pair, got {got}")
    x, y = batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: batch {number}: inputs must be a tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{where}: batch {number}: labels are not a tensor of class ids") from error
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{where}: batch {number}: labels must be integer class ids, got dtype {y.dtype}")
    if x.dim() == 0 or y.dim() != 1 or len(y) != len(x):
        hint = ""
        if y.dim() == 0:
            hint = " (this looks like one example, not a batch: wrap a dataset of examples in a DataLoader)"
        raise ValueError(
            f"{where}: batch {number}: labels of shape {tuple(y.shape)} do not match inputs of shape "
            f"{tuple(x.shape)}; expected one label per input row, shape ({len(x) if x.dim() else '?'},)"
            + hint
        )
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{where}: batch {number}: labels must be class ids >= 0, got {int(y.min())}")
    return x, y


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
