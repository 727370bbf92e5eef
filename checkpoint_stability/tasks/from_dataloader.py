"""The default task of a framework callback built with ``tasks=None``: from the trainer's validation data."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from checkpoint_stability.isolation import preserved_rng
from checkpoint_stability.tasks.base import Task
from checkpoint_stability.tasks.classification import ClassificationTask
from checkpoint_stability.tasks.next_token import NextTokenTask

DEFAULT_TASK_NAME = "validation"

SUPPORTED_SHAPES = (
    "(inputs, labels) batches with one integer class id per input row (a ClassificationTask), or "
    "dict batches with 'input_ids' and optional 'labels' / 'attention_mask' of the same shape "
    "(a causal LM: a NextTokenTask)"
)


def default_task_from_dataloader(
    dataloader: Iterable,
    *,
    name: str = DEFAULT_TASK_NAME,
    max_examples: int = 2048,
) -> Task:
    """The task a callback evaluates when it was given ``tasks=None``, built from validation batches.

    - ``(inputs, labels)`` batches (integer class ids, one per input row): a
      :class:`~checkpoint_stability.tasks.ClassificationTask` on the first ``max_examples`` examples.
    - Mappings with ``input_ids`` (and optional ``labels``, ``attention_mask``): a
      :class:`~checkpoint_stability.tasks.NextTokenTask` on the first ``max_examples`` predicted
      tokens (Hugging Face causal-LM batches: the target at position ``t`` is ``labels[t + 1]``).

    Anything else raises ``ValueError`` saying to pass ``tasks``. The loader is read once, up to what
    the task keeps, without advancing the caller's random number generators (python, numpy, torch), so
    training takes the same random path as without the callback. Every evaluation must see the same
    examples: a shuffling loader is read once here and its order then stays fixed.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from checkpoint_stability.tasks.from_dataloader import default_task_from_dataloader
        >>> data = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
        >>> default_task_from_dataloader(DataLoader(data, batch_size=4))
        ClassificationTask(name='validation', examples=10, batch_size=64)
    """
    if isinstance(dataloader, DataLoader) and isinstance(dataloader.sampler, DistributedSampler):
        raise ValueError(
            "the validation DataLoader uses a DistributedSampler, so each rank would read different "
            "examples; the default task needs the loader as written (the task splits examples across ranks "
            "itself): pass tasks=[...]"
        )
    if isinstance(dataloader, (str, bytes, Mapping)) or not isinstance(dataloader, Iterable):
        raise ValueError(
            f"the validation data is a {type(dataloader).__name__}, not an iterable of batches; the default "
            f"task needs {SUPPORTED_SHAPES}. Pass tasks=[...] to evaluate something else"
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
        kind = _batch_kind(first)
        everything = itertools.chain([first], batches)
        try:
            if kind == "classification":
                return ClassificationTask(name, everything, max_examples=max_examples)
            return NextTokenTask.from_batches(name, everything, max_tokens=max_examples)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"could not build the default task from the validation data ({error}); the default task "
                f"needs {SUPPORTED_SHAPES}. Pass tasks=[...] instead"
            ) from error


def _batch_kind(batch: Any) -> str:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(
                f"the validation batches are mappings with keys {sorted(map(str, batch))}, without "
                f"'input_ids'; the default task needs {SUPPORTED_SHAPES}. Pass tasks=[...] to evaluate "
                "this model"
            )
        ids, labels = batch["input_ids"], batch.get("labels")
        shape = getattr(ids, "shape", None)
        if labels is not None and shape is not None and getattr(labels, "shape", None) != shape:
            raise ValueError(
                f"the validation batches have 'labels' of shape {tuple(getattr(labels, 'shape', ()))} beside "
                f"'input_ids' of shape {tuple(shape)} (sequence classification?); the default task needs "
                f"{SUPPORTED_SHAPES}. Pass tasks=[...] to evaluate this model"
            )
        return "next_token"
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return "classification"
    described = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        described += f" of {len(batch)} ({', '.join(type(item).__name__ for item in batch)})"
    raise ValueError(
        f"the validation batches are a {described}; the default task needs {SUPPORTED_SHAPES}. "
        "Pass tasks=[...] to evaluate this model"
    )
