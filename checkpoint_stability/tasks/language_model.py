"""Calling a causal language model and tokenising text for it, whatever the model's framework.

Tasks accept any ``torch.nn.Module`` that maps token ids to next-token logits: a Hugging Face
``PreTrainedModel`` (output with ``.logits``), or a plain module returning a ``(batch, length, vocab)``
tensor (or a tuple / dict whose first entry / ``"logits"`` is one). A model called some other way (a
``forward=`` given to a task, or one that needs the targets) may also return them flattened,
``(batch * length, vocab)``: :func:`sequence_logits`.

Sequences are right-padded. For a causal model the padding after a sequence cannot change the
logits at its real positions, so no attention mask is needed for correctness; one is still passed to
models whose ``forward`` accepts ``attention_mask``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    """What tasks need from a tokenizer: a Hugging Face tokenizer, or anything with these methods."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (a BOS in the middle of a prompt would be wrong)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids]


def pad_token_id(tokenizer: Any, task: str, explicit: int | None = None) -> int:
    """The id used to right-pad batches; a clear error if the tokenizer has none and none was given."""
    if explicit is not None:
        return int(explicit)
    value = getattr(tokenizer, "pad_token_id", None)
    if value is None:
        raise ValueError(
            f"task {task!r}: the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
            "tokenizer.eos_token) or pass pad_token_id= to the task"
        )
    return int(value)


def _accepts_attention_mask(model: torch.nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in parameters


def causal_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str
) -> torch.Tensor:
    """Next-token logits ``(batch, length, vocab)`` of ``model`` for right-padded ``input_ids``."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    if _accepts_attention_mask(model):
        output = model(input_ids=input_ids, attention_mask=attention_mask.to(device))
    else:
        output = model(input_ids)
    logits = output_logits(output)
    if (
        not isinstance(logits, torch.Tensor)
        or logits.dim() != 3
        or tuple(logits.shape[:2]) != tuple(input_ids.shape)
    ):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(output).__name__
        raise TypeError(
            f"task {task!r}: the model must return next-token logits of shape (batch, length, vocab) "
            f"= ({input_ids.shape[0]}, {input_ids.shape[1]}, V), or an output with .logits; got {shape}"
        )
    return logits


def output_logits(output: Any) -> Any:
    """The logits in a model's output: the output itself if a tensor, else its ``.logits``, its
    ``"logits"`` entry or its first entry (whatever that is: the caller checks it is a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    return logits


def sequence_logits(output: Any, batch: int, length: int, task: str, called: str) -> torch.Tensor:
    """Logits ``(batch, length, vocab)`` from what ``called`` returned for ``(batch, length)`` inputs.

    Also accepted: ``(batch * length, vocab)``, the flattened logits a model returns when its loss is
    taken on ``logits.view(-1, vocab)`` (Lightning's demo ``Transformer`` does); they are reshaped.
    Anything else is a ``ValueError`` naming both shapes (``TypeError`` if there is no tensor at all).
    """
    logits = output_logits(output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"task {task!r}: {called} must return next-token logits of shape (batch, seq, vocab) "
            f"= ({batch}, {length}, V), or an output with .logits; got a {type(output).__name__}"
        )
    if logits.dim() == 3 and tuple(logits.shape[:2]) == (batch, length):
        return logits
    if logits.dim() == 2 and logits.shape[0] == batch * length and batch * length > 0:
        return logits.reshape(batch, length, logits.shape[1])
    raise ValueError(
        f"task {task!r}: {called} must return next-token logits of shape (batch, seq, vocab) = "
        f"({batch}, {length}, V), or (batch * seq, vocab) = ({batch * length}, V); got shape "
        f"{tuple(logits.shape)}"
    )


def required_positional_arguments(model: torch.nn.Module) -> int:
    """How many positional arguments ``model.forward`` requires (no default; ``self`` not counted);
    0 when its signature cannot be read (a C function, a ``(*args, **kwargs)`` wrapper)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of right-padded sequences."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
