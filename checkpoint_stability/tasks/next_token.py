"""NextTokenTask: every predicted token of a set of token sequences is an example (token accuracy)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.tasks.base import TaskResult, validate_task_name
from checkpoint_stability.tasks.language_model import (
    causal_logits,
    model_device,
    required_positional_arguments,
    right_pad,
    sequence_logits,
)
from checkpoint_stability.tasks.progress import progress
from checkpoint_stability.tasks.sharding import gather_in_order, shard_examples
from checkpoint_stability.validation import is_int, require_int

# One row: its number, its token ids, per position t the target the model should predict there (None:
# no target), and for (inputs, targets) pairs the target row as the model is given it (None otherwise).
_Row = tuple[int, list[int], list[int | None], list[int] | None]

Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any]
"""``forward(model, inputs, second) -> logits``: ``second`` is the targets for a task built from
``(inputs, targets)`` pairs and the attention mask otherwise (see :class:`NextTokenTask`)."""


class NextTokenTask:
    """Next-token accuracy of a causal LM on fixed token sequences, one example per predicted token.

    For a sequence ``x``, position ``t`` is an example: the output is the model's argmax token id at
    ``t``, the target is ``x[t + 1]``, and ``correct`` is 1 if they are equal. The score is the token
    accuracy. Example ids are ``"s{sequence}:t{position}"``.

    Only the first ``max_tokens`` predicted tokens are kept, taken in order: every position of the first
    sequence, then of the second, and so on, the last one cut short. So the examples do not change
    between evaluations, and a long validation set costs at most ``max_tokens`` predictions.

    :meth:`from_batches` builds the task from Hugging Face style causal-LM batches (``input_ids`` with
    optional ``labels`` and ``attention_mask``, or bare ``input_ids`` tensors), and :meth:`from_pairs`
    from ``(inputs, targets)`` batches whose targets are already shifted (Lightning's demo ``WikiText2``)
    — how a training framework's own validation data becomes the default task.

    How the model is called, ``forward``:

    - ``None`` (default), token sequences or ``input_ids`` batches: ``model(input_ids)``, or
      ``model(input_ids=..., attention_mask=...)`` when ``forward`` accepts ``attention_mask``; the
      logits are ``(batch, seq, vocab)`` (or an output with ``.logits``).
    - ``None``, ``(inputs, targets)`` pairs: ``model(inputs, targets)`` when the model's ``forward``
      requires two or more positional arguments (as Lightning's demo ``LightningTransformer`` does,
      whose ``training_step`` calls ``self(inputs, target)``), else ``model(inputs)``; the signature is
      read once per evaluation.
    - a callable: ``forward(model, input_ids, attention_mask)`` for sequences and ``input_ids``
      batches, ``forward(model, inputs, targets)`` for pairs; tensors ``(batch, seq)`` on the model's
      device, right-padded with ``pad_token_id``. For example
      ``forward=lambda model, inputs, targets: model(inputs, targets)``.

    Except for the first case, the logits may also come flattened, ``(batch * seq, vocab)`` (Lightning's
    demo ``Transformer`` returns ``output.view(-1, vocab)``); any other shape is a ``ValueError`` naming
    the shape expected and the one received. The model is evaluated in eval mode without gradients; its
    train/eval flags (every submodule's), the grad mode and the random generators are restored after.

    Any causal LM that maps token ids to logits works (see :mod:`checkpoint_stability.tasks.language_model`).
    Under ``torch.distributed`` the sequences are split across ranks in equal padded shares and the
    predictions gathered back in order.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks.next_token import NextTokenTask
        >>> class Increment(torch.nn.Module):  # a toy causal LM: predicts "previous token + 1"
        ...     def forward(self, input_ids):
        ...         return torch.nn.functional.one_hot((input_ids + 1) % 10, 10).float()
        >>> task = NextTokenTask("count", [[1, 2, 3, 5], [7, 8]], max_tokens=3)
        >>> result = task.evaluate(Increment())
        >>> result.example_ids, result.outputs, result.targets, result.score
        (['s0:t0', 's0:t1', 's0:t2'], [2, 3, 4], [2, 3, 5], 0.6666666666666666)
    """

    kind = "next_token"
    metric = "accuracy"
    origin: str | None = None
    """Who built the task from what, e.g. ``"built by tasks=None from the validation data"`` (set by
    :func:`~checkpoint_stability.tasks.task_from_dataloader`; ``None`` for a task built directly)."""
    description: str | None = None
    """What the task measures on how much of which data, e.g. ``"next-token accuracy on the first 2,048
    of 10,240 tokens of the validation data"`` (set with ``origin``)."""
    show_progress: bool = True
    """A progress bar on rank 0 for evaluations longer than a couple of seconds; set False to silence."""

    def __init__(
        self,
        name: str,
        sequences: Iterable[Sequence[int] | torch.Tensor],
        *,
        max_tokens: int = 2048,
        batch_size: int = 8,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        forward: Forward | None = None,
    ):
        """
        Args:
            name: the task's name in logged keys and file names.
            sequences: token id sequences (lists, 1-d integer tensors or arrays), each at least 2 long.
                Read in order, and only until ``max_tokens`` predicted tokens are collected.
            max_tokens: the most predicted tokens (examples) kept, the first ones in order (>= 1).
            batch_size: sequences per forward pass.
            pad_token_id: id used to right-pad batches; any valid id, as padding after a sequence cannot
                change a causal model's logits at its real positions.
            ignore_index: the label value meaning "no target here" (``labels`` in :meth:`from_batches`,
                ``targets`` in :meth:`from_pairs`).
            forward: how to call the model, ``forward(model, input_ids, attention_mask) -> logits``
                (``forward(model, inputs, targets)`` for :meth:`from_pairs`); ``None`` calls the model
                itself (see the class docstring).
        """
        self._configure(name, max_tokens, batch_size, pad_token_id, ignore_index, forward, pairs=False)
        if isinstance(sequences, (str, bytes, Mapping)) or not isinstance(sequences, Iterable):
            raise TypeError(
                f"task {name!r}: sequences must be a list of token id sequences, "
                f"got {type(sequences).__name__}"
            )
        self._collect(self._plain_rows(sequences))

    @classmethod
    def from_batches(
        cls,
        name: str,
        batches: Iterable[Mapping[str, Any] | torch.Tensor],
        *,
        max_tokens: int = 2048,
        batch_size: int = 8,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        forward: Forward | None = None,
    ) -> NextTokenTask:
        """A task from causal-LM batches: ``input_ids`` with optional ``labels`` and ``attention_mask``.

        A batch is a mapping, or a bare ``(batch, seq)`` integer tensor read as ``{"input_ids": it}``.
        ``forward``, if given, is called as ``forward(model, input_ids, attention_mask)``.

        Each row of a batch is a sequence, numbered across batches in order. Positions whose
        ``attention_mask`` is 0 are padding and are dropped (the real tokens must be one contiguous run).
        Without ``labels`` the target at position ``t`` is the next input token; with them it is
        ``labels[t + 1]``, the shift Hugging Face's causal-LM loss applies, and positions whose label is
        ``ignore_index`` are not examples. Rows with no target are skipped. Batches are read lazily and
        only until ``max_tokens`` predicted tokens are collected, so an endless loader is fine.
        """
        task = cls.__new__(cls)
        task._configure(name, max_tokens, batch_size, pad_token_id, ignore_index, forward, pairs=False)
        if isinstance(batches, (str, bytes, Mapping, torch.Tensor)) or not isinstance(batches, Iterable):
            raise TypeError(f"task {name!r}: batches must be an iterable of mappings, got {type(batches)}")
        task._collect(task._batch_rows(batches))
        return task

    @classmethod
    def from_pairs(
        cls,
        name: str,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]],
        *,
        max_tokens: int = 2048,
        batch_size: int = 8,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        forward: Forward | None = None,
    ) -> NextTokenTask:
        """A task from ``(inputs, targets)`` batches of token ids of one shape, ``(batch, seq)``.

        The targets are already shifted: the target at position ``t`` is ``targets[t]`` (Lightning's
        demo ``WikiText2`` yields ``data[i : i + 35]`` and ``data[i + 1 : i + 36]``), and positions whose
        target is ``ignore_index`` are not examples. The model is given whole rows (never cut at
        ``max_tokens``, since a model that reads the targets, or attends both ways, would see a
        different input); rows of different lengths are right-padded with ``pad_token_id``, inputs and
        targets alike, and only real positions are read. ``forward``, if given, is called as
        ``forward(model, inputs, targets)``; without it see the class docstring. Batches are read lazily
        and only until ``max_tokens`` predicted tokens are collected.
        """
        task = cls.__new__(cls)
        task._configure(name, max_tokens, batch_size, pad_token_id, ignore_index, forward, pairs=True)
        if isinstance(batches, (str, bytes, Mapping, torch.Tensor)) or not isinstance(batches, Iterable):
            raise TypeError(
                f"task {name!r}: batches must be an iterable of (inputs, targets) pairs, got {type(batches)}"
            )
        task._collect(task._pair_rows(batches))
        return task

    def _configure(
        self, name, max_tokens, batch_size, pad_token_id, ignore_index, forward, *, pairs: bool
    ) -> None:
        self.name = validate_task_name(name)
        where = f"task {name!r}"
        self.max_tokens = require_int("max_tokens", max_tokens, 1, where=where)
        self.batch_size = require_int("batch_size", batch_size, 1, where=where)
        self.pad_token_id = require_int("pad_token_id", pad_token_id, 0, where=where)
        self.ignore_index = require_int("ignore_index", ignore_index, where=where)
        if forward is not None and not callable(forward):
            raise TypeError(f"{where}: forward must be callable, got {type(forward).__name__}")
        self.forward: Forward | None = forward
        # Built from (inputs, targets) pairs: the model may be given the targets, and sees whole rows.
        self.pairs = pairs

    # ------------------------------------------------------------------ building the examples

    def _plain_rows(self, sequences: Iterable) -> Iterator[_Row]:
        for index, sequence in enumerate(sequences):
            ids = _token_ids(self.name, sequence, f"sequence {index}")
            if len(ids) < 2:
                raise ValueError(
                    f"task {self.name!r}: sequence {index} has {len(ids)} token(s); "
                    "at least 2 are needed to predict one"
                )
            yield index, ids, list(ids[1:]), None

    def _batch_rows(self, batches: Iterable) -> Iterator[_Row]:
        number = 0
        for batch_index, batch in enumerate(batches):
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError(
                    f"task {self.name!r}: batch {batch_index} must be a mapping with 'input_ids' "
                    f"(and optional 'labels', 'attention_mask') or an input_ids tensor, "
                    f"got {type(batch).__name__}"
                )
            where = f"batch {batch_index}"
            inputs = _token_rows(self.name, batch["input_ids"], f"{where} input_ids")
            labels = _optional_rows(self.name, batch, "labels", where, inputs)
            masks = _optional_rows(self.name, batch, "attention_mask", where, inputs)
            for row, ids in enumerate(inputs):
                keep: list[int] | range = range(len(ids))
                if masks is not None:
                    keep = [t for t, flag in enumerate(masks[row]) if flag]
                    if keep and keep != list(range(keep[0], keep[-1] + 1)):
                        raise ValueError(
                            f"task {self.name!r}: {where} row {row} has an attention_mask with gaps; "
                            "only padding before or after one run of real tokens is supported"
                        )
                tokens = [ids[t] for t in keep]
                if labels is None:
                    targets: list[int | None] = list(tokens[1:])
                else:
                    kept = [labels[row][t] for t in keep][1:]
                    targets = [None if label == self.ignore_index else label for label in kept]
                self._check_targets(targets, f"{where} row {row}", "label", first_position=1)
                yield number, tokens, targets, None
                number += 1

    def _pair_rows(self, batches: Iterable) -> Iterator[_Row]:
        number = 0
        for batch_index, batch in enumerate(batches):
            if (
                isinstance(batch, (str, bytes, Mapping))
                or not isinstance(batch, (tuple, list))
                or len(batch) != 2
            ):
                raise ValueError(
                    f"task {self.name!r}: batch {batch_index} must be an (inputs, targets) pair, "
                    f"got {type(batch).__name__}"
                )
            where = f"batch {batch_index}"
            inputs = _token_rows(self.name, batch[0], f"{where} inputs")
            targets = _token_rows(self.name, batch[1], f"{where} targets", signed=True)
            if [len(row) for row in targets] != [len(row) for row in inputs]:
                raise ValueError(f"task {self.name!r}: {where} targets do not have the shape of the inputs")
            for row, (ids, fed) in enumerate(zip(inputs, targets, strict=True)):
                kept: list[int | None] = [None if y == self.ignore_index else y for y in fed]
                self._check_targets(kept, f"{where} row {row}", "target", first_position=0)
                yield number, ids, kept, fed
                number += 1

    def _check_targets(
        self, targets: Sequence[int | None], where: str, noun: str, *, first_position: int
    ) -> None:
        """Every target is a token id (None: no target there); ``first_position``: the input position
        of ``targets[0]`` (1 for labels, which are shifted; 0 for already-shifted targets)."""
        for t, target in enumerate(targets):
            if target is not None and target < 0:
                raise ValueError(
                    f"task {self.name!r}: {where} has the {noun} {target} at position "
                    f"{t + first_position}; {noun}s are token ids or ignore_index ({self.ignore_index})"
                )

    def _collect(self, rows: Iterator[_Row]) -> None:
        """Keep the first ``max_tokens`` predicted tokens, reading ``rows`` no further than needed."""
        self._sequences: list[list[int]] = []
        self._fed_targets: list[list[int]] = []
        self._positions: list[list[int]] = []
        self.targets: list[int] = []
        self.example_ids: list[str] = []
        for number, ids, targets, fed in rows:
            room = self.max_tokens - len(self.targets)
            positions = list(itertools.islice((t for t, y in enumerate(targets) if y is not None), room))
            if not positions:
                continue
            if fed is None:
                # A causal model only needs the tokens up to the last kept position.
                self._sequences.append(ids[: positions[-1] + 1])
            else:
                self._sequences.append(ids)
                self._fed_targets.append(fed)
            self._positions.append(positions)
            self.targets.extend(target for target in (targets[t] for t in positions) if target is not None)
            self.example_ids.extend(f"s{number}:t{t}" for t in positions)
            if len(self.targets) >= self.max_tokens:
                break
        if not self.targets:
            raise ValueError(
                f"task {self.name!r}: no sequences with a token to predict; a task needs at least one "
                "sequence of 2 or more tokens (with a label other than ignore_index)"
            )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        shard = shard_examples(len(self._sequences))
        local: list[list[int]] = []
        batches = range(0, shard.size, self.batch_size)
        with (
            isolated_evaluation(model),
            progress(len(batches), self.name, enabled=self.show_progress) as bar,
        ):
            logits_of = self._logits_function(model)  # the signature is read once per evaluation
            for start in batches:
                bar.update()
                indices = shard.indices[start : start + self.batch_size]
                ids, mask = right_pad([self._sequences[i] for i in indices], self.pad_token_id)
                second = mask
                if self.pairs:
                    second, _ = right_pad([self._fed_targets[i] for i in indices], self.pad_token_id)
                predicted = logits_of(ids, second).argmax(-1).cpu()
                local.extend(predicted[k, self._positions[i]].tolist() for k, i in enumerate(indices))
        outputs = [token for sequence in gather_in_order(local, shard) for token in sequence]
        return TaskResult(
            outputs=outputs,
            correct=self.score(outputs),
            targets=list(self.targets),
            example_ids=list(self.example_ids),
        )

    def _logits_function(
        self, model: torch.nn.Module
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``logits(inputs, second) -> (batch, seq, vocab)``, ``second`` being the padded targets
        (pairs) or the attention mask, calling the model as the class docstring says."""
        device = model_device(model)
        forward = self.forward
        if forward is None and not self.pairs:
            return lambda ids, mask: causal_logits(model, ids, mask, self.name)
        if forward is not None:
            called = (
                "forward(model, inputs, targets)"
                if self.pairs
                else "forward(model, input_ids, attention_mask)"
            )

            def call(ids: torch.Tensor, second: torch.Tensor) -> Any:
                return forward(model, ids.to(device), second.to(device))

        elif required_positional_arguments(model) >= 2:
            called = "model(inputs, targets)"

            def call(ids: torch.Tensor, second: torch.Tensor) -> Any:
                return model(ids.to(device), second.to(device))

        else:
            called = "model(inputs)"

            def call(ids: torch.Tensor, second: torch.Tensor) -> Any:
                return model(ids.to(device))

        def logits(ids: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return sequence_logits(call(ids, second), ids.shape[0], ids.shape[1], self.name, called)

        return logits

    def score(self, outputs: Sequence) -> list[float]:
        if len(outputs) != len(self.targets):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.targets)} targets")
        return [
            1.0 if output == target else 0.0 for output, target in zip(outputs, self.targets, strict=True)
        ]

    def __repr__(self) -> str:
        return (
            f"NextTokenTask(name={self.name!r}, sequences={len(self._sequences)}, tokens={len(self.targets)})"
        )


def _token_ids(name: str, value: Any, what: str, *, signed: bool = False) -> list[int]:
    """A 1-d sequence of integer ids as a list of ints: TypeError for non-integers, ValueError for
    negative ids (unless ``signed``: labels hold ``ignore_index``, checked by the caller)."""
    if isinstance(value, torch.Tensor) or hasattr(value, "dtype"):
        dtype = value.dtype
        if isinstance(dtype, torch.dtype):
            integral = not (dtype.is_floating_point or dtype.is_complex) and dtype != torch.bool
        else:
            integral = getattr(dtype, "kind", "") in ("i", "u")
        if not integral or len(value.shape) != 1:
            raise TypeError(
                f"task {name!r}: {what} must be a 1-d integer sequence, got {dtype} of shape "
                f"{tuple(value.shape)}"
            )
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"task {name!r}: {what} must be a sequence of token ids, got {type(value).__name__}")
    ids = list(value)
    for t, token in enumerate(ids):
        if not is_int(token):
            raise TypeError(f"task {name!r}: {what} has {token!r} at position {t}; token ids are integers")
        if token < 0 and not signed:
            raise ValueError(f"task {name!r}: {what} has the negative id {token} at position {t}")
    return [int(token) for token in ids]


def _token_rows(name: str, value: Any, what: str, *, signed: bool = False) -> list[list[int]]:
    """A batch ``(rows, length)`` of integer ids (a single 1-d row is one row)."""
    if isinstance(value, torch.Tensor) or hasattr(value, "shape"):
        if len(value.shape) == 1:
            return [_token_ids(name, value, what, signed=signed)]
        if len(value.shape) != 2:
            raise TypeError(f"task {name!r}: {what} must be 1-d or 2-d, got shape {tuple(value.shape)}")
        return [_token_ids(name, row, f"{what} row {r}", signed=signed) for r, row in enumerate(value)]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"task {name!r}: {what} must be a batch of token ids, got {type(value).__name__}")
    value = list(value)
    if value and not any(isinstance(v, Iterable) for v in value):
        return [_token_ids(name, value, what, signed=signed)]
    return [_token_ids(name, row, f"{what} row {r}", signed=signed) for r, row in enumerate(value)]


def _optional_rows(name: str, batch: Mapping, key: str, where: str, inputs: list[list[int]]):
    if batch.get(key) is None:
        return None
    rows = _token_rows(name, batch[key], f"{where} {key}", signed=key == "labels")
    if [len(r) for r in rows] != [len(r) for r in inputs]:
        raise ValueError(f"task {name!r}: {where} {key} does not have the shape of input_ids")
    return rows
