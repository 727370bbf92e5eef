"""A task from a validation loader: the default task of a callback built with ``tasks=None``, and
:func:`task_from_dataloader`, the same builder for a user who wants to say how the model is called."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from checkpoint_stability.isolation import preserved_rng
from checkpoint_stability.tasks.base import Task
from checkpoint_stability.tasks.classification import ClassificationTask
from checkpoint_stability.tasks.next_token import NextTokenTask
from checkpoint_stability.validation import require_int

DEFAULT_TASK_NAME = "validation"
DEFAULT_SOURCE = "the validation data"
IGNORE_INDEX = -100

SUPPORTED_SHAPES = (
    "(inputs, targets) batches of integer token ids of one shape (batch, seq), the targets already "
    "shifted (a NextTokenTask); (inputs, labels) batches with one integer class id per input row (a "
    "ClassificationTask); dict batches with 'input_ids' and optional 'labels' / 'attention_mask' of the "
    "same shape, or bare (batch, seq) input_ids tensors, alone or in a one-item list as a TensorDataset "
    "yields them (a causal LM: a NextTokenTask)"
)

IMPORT_LINE = "from checkpoint_stability.tasks import task_from_dataloader"
PAIRS_FORWARD = "lambda model, inputs, targets: model(inputs, targets)"
INPUT_IDS_FORWARD = "lambda model, input_ids, attention_mask: model(input_ids, attention_mask=attention_mask)"
CLASSIFICATION_FORWARD = "lambda model, inputs: model(inputs)"


class UnsupportedValidationData(ValueError):
    """The validation data cannot become a default task; ``fix`` is a snippet that replaces it."""

    def __init__(self, message: str, fix: str):
        super().__init__(f"{message}. Pass tasks=[...] instead, for example:\n{fix}")
        self.fix = fix


def task_from_dataloader(
    dataloader: Iterable,
    *,
    name: str = DEFAULT_TASK_NAME,
    max_examples: int = 2048,
    forward: Callable[..., Any] | None = None,
) -> Task:
    """A task on the first ``max_examples`` examples of a validation loader, by the shape of its batches.

    - ``(inputs, targets)`` integer tensors of one shape ``(batch, seq)``: a
      :class:`~checkpoint_stability.tasks.NextTokenTask` (:meth:`~NextTokenTask.from_pairs`) whose
      target at position ``t`` is ``targets[t]`` (already shifted, as Lightning's demo ``WikiText2``
      yields them); the output at ``t`` is the argmax of the model's logits there. Without ``forward``
      the model is called as ``model(inputs, targets)`` when its ``forward`` requires two or more
      positional arguments (as the training step of Lightning's demo ``LightningTransformer`` calls it),
      else ``model(inputs)``; with it, ``forward(model, inputs, targets) -> logits``.
    - ``(inputs, labels)`` with one integer class id per input row: a
      :class:`~checkpoint_stability.tasks.ClassificationTask`; ``forward(model, inputs) -> logits``.
    - Mappings with ``input_ids`` (and optional ``labels``, ``attention_mask``), or bare ``(batch, seq)``
      integer tensors of input ids: a ``NextTokenTask`` (:meth:`~NextTokenTask.from_batches`; the target
      at ``t`` is ``labels[t + 1]``, Hugging Face's causal-LM shift, or the next input token without
      labels); ``forward(model, input_ids, attention_mask) -> logits``.

    Next-token logits are ``(batch, seq, vocab)`` or ``(batch * seq, vocab)``. An example is a predicted
    token for a ``NextTokenTask``, a row for a ``ClassificationTask``. Anything else raises ``ValueError``
    ending with a snippet that replaces the task (:func:`default_task_fix`).

    The task gets two strings: ``origin`` (who built it from what) and ``description`` (what it
    measures, on how much of the data), e.g. ``"next-token accuracy on the first 2,048 of 10,240
    tokens of the validation data"``. To count the total, a finite loader that has a ``len()`` is read
    to its end; otherwise the description says only ``"the first 2,048 tokens of ..."``.

    The loader is read without advancing the caller's random number generators (python, numpy, torch),
    so training takes the same random path as without the task. Every evaluation must see the same
    examples: a shuffling loader is read once here and its order then stays fixed.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from checkpoint_stability.tasks import task_from_dataloader
        >>> data = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
        >>> task = task_from_dataloader(DataLoader(data, batch_size=4), max_examples=8)
        >>> task, task.description
        (ClassificationTask(name='validation', examples=8, batch_size=64), 'classification accuracy on the first 8 of 10 examples of the validation data')
    """  # noqa: E501
    return _build(dataloader, name, max_examples, forward, DEFAULT_SOURCE, "task_from_dataloader")


def default_task_from_dataloader(
    dataloader: Iterable,
    *,
    name: str = DEFAULT_TASK_NAME,
    max_examples: int = 2048,
    source: str = DEFAULT_SOURCE,
) -> Task:
    """The task a callback evaluates when it was given ``tasks=None``: :func:`task_from_dataloader`
    without ``forward``, its ``origin`` ``"built by tasks=None from <source>"`` and ``source`` (where
    the loader comes from, e.g. ``"the Trainer's eval_dataset"``) named in its ``description``.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks.from_dataloader import default_task_from_dataloader
        >>> tokens = torch.randint(0, 50, (4, 9))
        >>> task = default_task_from_dataloader([(tokens[:, :-1], tokens[:, 1:])], source="eval_dataset")
        >>> task.origin
        'built by tasks=None from eval_dataset'
        >>> print(task.description)
        next-token accuracy on the first 32 of 32 tokens of eval_dataset, (inputs, targets) batches: calls model(inputs, targets) if the model's forward requires 2 positional arguments, else model(inputs)
    """  # noqa: E501
    return _build(dataloader, name, max_examples, None, source, "tasks=None")


def default_task_fix(task: Task | None, error: BaseException | None) -> str:
    """A short runnable snippet that replaces a default task which cannot work, for the user to paste.

    ``task`` is the default task that failed (at its first evaluation, say), or ``None`` when none could
    be built; ``error`` what was raised, or ``None``. The snippet fits the batch shape: for
    ``(inputs, targets)`` token pairs ::

        from checkpoint_stability.tasks import task_from_dataloader
        StabilityCallback(tasks=[task_from_dataloader(val_loader, forward=lambda model, inputs, targets: model(inputs, targets))])

    and likewise ``forward=lambda model, input_ids, attention_mask: ...`` for ``input_ids`` batches and
    ``forward=lambda model, inputs: model(inputs)`` for classification; an error raised while building
    (an unsupported batch shape) carries its own snippet, which is returned. ``val_loader`` stands for
    the user's validation loader; ``forward`` should return the model's logits.
    """  # noqa: E501
    fix = getattr(error, "fix", None)
    if isinstance(fix, str):
        return fix
    if isinstance(task, NextTokenTask) and not task.pairs:
        return _snippet("val_loader", INPUT_IDS_FORWARD)
    if isinstance(task, ClassificationTask):
        return _snippet("val_loader", CLASSIFICATION_FORWARD)
    return _snippet("val_loader", PAIRS_FORWARD)


# ---------------------------------------------------------------------------------------- building


def _build(
    dataloader: Iterable,
    name: str,
    max_examples: int,
    forward: Callable[..., Any] | None,
    source: str,
    built_by: str,
) -> Task:
    max_examples = require_int("max_examples", max_examples, 1, where=f"task {name!r}")
    if isinstance(dataloader, DataLoader) and isinstance(dataloader.sampler, DistributedSampler):
        raise UnsupportedValidationData(
            "the validation DataLoader uses a DistributedSampler, so each rank would read different "
            "examples; the task needs the loader as written (it splits examples across ranks itself)",
            _snippet(
                "DataLoader(val_loader.dataset, batch_size=val_loader.batch_size, "
                "collate_fn=val_loader.collate_fn)",
                None,
                imports="from torch.utils.data import DataLoader",
            ),
        )
    if isinstance(dataloader, (str, bytes, Mapping)) or not isinstance(dataloader, Iterable):
        raise UnsupportedValidationData(
            f"the validation data is a {type(dataloader).__name__}, not an iterable of batches; the "
            f"default task needs {SUPPORTED_SHAPES}",
            _snippet("val_loader", PAIRS_FORWARD),
        )
    # A DataLoader iterator draws its base seed from torch's generator; datasets may draw from any.
    with preserved_rng(cuda=False):
        batches = iter(dataloader)
        try:
            first = next(batches)
        except StopIteration:
            raise ValueError(
                "the validation data holds no batches, so there is nothing to build the default task from: "
                "pass tasks=[...]"
            ) from None
        stream: Iterator = itertools.chain([first], batches)
        if isinstance(first, (tuple, list)) and len(first) == 1 and isinstance(first[0], torch.Tensor):
            # A TensorDataset of one tensor yields [input_ids]: the tensor is the batch.
            first, stream = first[0], (batch[0] for batch in stream)
        kind = _batch_kind(first)
        counted = _CountedBatches(stream, kind)
        everything = iter(counted)
        try:
            task: ClassificationTask | NextTokenTask
            if kind == "classification":
                task = ClassificationTask(name, everything, max_examples=max_examples, forward=forward)
            elif kind == "pairs":
                task = NextTokenTask.from_pairs(name, everything, max_tokens=max_examples, forward=forward)
            else:
                task = NextTokenTask.from_batches(name, everything, max_tokens=max_examples, forward=forward)
        except (TypeError, ValueError) as error:
            raise UnsupportedValidationData(
                f"could not build the default task from the validation data ({error}); the default task "
                f"needs {SUPPORTED_SHAPES}",
                _fix_for_batch(first),
            ) from error
        if not counted.exhausted and _is_sized(dataloader):
            for _ in everything:  # count the rest: the total goes into the description
                pass
    total = counted.total if counted.exhausted else None
    task.origin = f"built by {built_by} from {source}"
    task.description = _describe(task, kind, total, source, forward)
    return task


def _batch_kind(batch: Any) -> str:
    """``"classification"``, ``"pairs"`` or ``"input_ids"``; an error with a fix for anything else."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise UnsupportedValidationData(
                f"the validation batches are mappings with keys {sorted(map(str, batch))}, without "
                f"'input_ids'; the default task needs {SUPPORTED_SHAPES}",
                _fix_for_batch(batch),
            )
        ids, labels = batch["input_ids"], batch.get("labels")
        shape = getattr(ids, "shape", None)
        if labels is not None and shape is not None and getattr(labels, "shape", None) != shape:
            raise UnsupportedValidationData(
                f"the validation batches have 'labels' of shape {tuple(getattr(labels, 'shape', ()))} beside "
                f"'input_ids' of shape {tuple(shape)} (sequence classification?); the default task needs "
                f"{SUPPORTED_SHAPES}",
                _fix_for_batch(batch),
            )
        return "input_ids"
    if isinstance(batch, torch.Tensor) and _is_token_tensor(batch) and batch.dim() == 2:
        return "input_ids"
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        inputs, targets = batch
        if (
            isinstance(targets, torch.Tensor)
            and _is_token_tensor(inputs)
            and _is_token_tensor(targets)
            and inputs.dim() == 2
            and inputs.shape == targets.shape
        ):
            return "pairs"
        return "classification"
    described = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        described += f" of {len(batch)} ({', '.join(type(item).__name__ for item in batch)})"
    elif isinstance(batch, torch.Tensor):
        described += f" of {batch.dtype} and shape {tuple(batch.shape)}"
    raise UnsupportedValidationData(
        f"the validation batches are a {described}; the default task needs {SUPPORTED_SHAPES}",
        _fix_for_batch(batch),
    )


def _is_token_tensor(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not (value.dtype.is_floating_point or value.dtype.is_complex)
        and value.dtype != torch.bool
    )


def _is_sized(dataloader: Iterable) -> bool:
    try:
        len(dataloader)  # type: ignore[arg-type]
    except TypeError:  # no __len__, or an IterableDataset's loader without one
        return False
    return True


class _CountedBatches:
    """Passes batches through, adding up the examples each holds (predicted tokens, or rows).

    ``total`` is exact once ``exhausted``; a batch it cannot count leaves the total unknown (the task
    reports the batch's problem itself).
    """

    def __init__(self, batches: Iterator, kind: str):
        self._batches = batches
        self._kind = kind
        self.total: int | None = 0
        self.exhausted = False

    def __iter__(self) -> Iterator:
        for batch in self._batches:
            if self.total is not None:
                try:
                    self.total += _examples_in(self._kind, batch)
                except (TypeError, ValueError, RuntimeError, IndexError, KeyError):
                    self.total = None
            yield batch
        self.exhausted = True


def _examples_in(kind: str, batch: Any) -> int:
    """The examples a batch gives the task, counted with tensor operations (no per-token Python)."""
    if kind == "classification":
        return len(batch[1])
    if kind == "pairs":
        return int((torch.as_tensor(batch[1]) != IGNORE_INDEX).sum())
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids[None]
    mask = batch.get("attention_mask")
    kept = (
        torch.ones_like(ids, dtype=torch.bool)
        if mask is None
        else torch.as_tensor(mask).reshape(ids.shape) != 0
    )
    labels = batch.get("labels")
    if labels is None:
        # Every kept token but a row's first is the target of the one before it.
        return int((kept.sum(dim=1) - 1).clamp(min=0).sum())
    targets = kept & (torch.as_tensor(labels).reshape(ids.shape) != IGNORE_INDEX)
    # A row's first kept position is the target of nothing (no token before it is kept).
    first = kept.int().argmax(dim=1)
    firsts = targets[torch.arange(len(ids)), first] & kept.any(dim=1)
    return int(targets.sum() - firsts.sum())


def _describe(
    task: ClassificationTask | NextTokenTask,
    kind: str,
    total: int | None,
    source: str,
    forward: Callable[..., Any] | None,
) -> str:
    kept = len(task.targets)
    unit, measure = (
        ("examples", "classification accuracy")
        if kind == "classification"
        else ("tokens", "next-token accuracy")
    )
    if total is None:
        description = f"{measure} on the first {kept:,} {_plural(kept, unit)} of {source}"
    else:
        description = f"{measure} on the first {kept:,} of {total:,} {_plural(total, unit)} of {source}"
    if kind == "pairs":
        if forward is None:
            return (
                f"{description}, (inputs, targets) batches: calls model(inputs, targets) if the model's "
                "forward requires 2 positional arguments, else model(inputs)"
            )
        return f"{description}, (inputs, targets) batches: calls forward(model, inputs, targets)"
    if forward is not None:
        called = (
            "forward(model, inputs)"
            if kind == "classification"
            else "forward(model, input_ids, attention_mask)"
        )
        return f"{description}: calls {called}"
    return description


def _plural(count: int, unit: str) -> str:
    return unit if count != 1 else unit[:-1]


# ---------------------------------------------------------------------------------------- fixes


def _snippet(loader: str, forward: str | None, *, imports: str = "") -> str:
    arguments = loader if forward is None else f"{loader}, forward={forward}"
    lines = [IMPORT_LINE, *([imports] if imports else [])]
    return "\n".join([*lines, f"StabilityCallback(tasks=[task_from_dataloader({arguments})])"])


def _fix_for_batch(batch: Any) -> str:
    """A snippet that turns batches like ``batch`` into pairs the builder reads, with a ``forward``."""
    picked: tuple[Any, Any] | None = None
    if isinstance(batch, Mapping):
        keys = [str(key) for key in batch]
        target_key = next((k for k in ("labels", "label", "targets", "target", "y") if k in batch), None)
        if "input_ids" in batch and target_key is not None:
            input_key: str | None = "input_ids"
        else:
            input_key = next((k for k in keys if k != target_key), None)
        if input_key is not None and target_key is not None:
            picked = (batch[input_key], batch[target_key])
            pairs = f'((batch["{input_key}"], batch["{target_key}"]) for batch in val_loader)'
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        picked = (batch[0], batch[1])
        pairs = "((batch[0], batch[1]) for batch in val_loader)"
    if picked is None:
        return _snippet("val_loader", PAIRS_FORWARD)
    inputs, targets = picked
    tokens = (
        _is_token_tensor(inputs)
        and _is_token_tensor(targets)
        and inputs.dim() == 2
        and inputs.shape == targets.shape
    )
    if tokens:
        forward = PAIRS_FORWARD
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        forward = "lambda model, inputs: model(input_ids=inputs)"
    else:
        forward = CLASSIFICATION_FORWARD
    return _snippet(pairs, forward)
