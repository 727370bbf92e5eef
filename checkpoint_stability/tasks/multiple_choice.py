"""MultipleChoiceTask: pick the choice a causal LM finds most likely, scored as lm-evaluation-harness does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.tasks.base import TaskResult, validate_example_ids, validate_task_name
from checkpoint_stability.tasks.language_model import causal_logits, encode, right_pad
from checkpoint_stability.tasks.language_model import pad_token_id as resolve_pad_token_id
from checkpoint_stability.tasks.progress import progress
from checkpoint_stability.tasks.sharding import gather_in_order, max_over_ranks, shard_examples
from checkpoint_stability.validation import is_int, require_int

NORMALIZATIONS = ("none", "chars", "tokens")


class MultipleChoiceTask:
    """Multiple-choice accuracy by log-likelihood, computed exactly as lm-evaluation-harness does it.

    Each example is ``{"context": str, "choices": [str, ...], "label": int}`` (examples may have different
    numbers of choices). Every choice is scored by the summed log-probability of the continuation
    ``target_delimiter + choice`` given ``few_shot_prefix + context``, tokenised the way lm-eval's
    ``loglikelihood`` tokenises a request for a causal LM (``TemplateLM._encode_pair``): trailing whitespace
    of the context moves to the continuation, ``context + continuation`` is encoded whole, and the
    continuation is the tokens after the first ``len(encode(context))``; an empty context is conditioned
    on the tokenizer's BOS token (EOS if it has none). The model reads
    ``(context_tokens + continuation_tokens)[:-1]``, left-truncated to its last ``max_length`` tokens when
    ``max_length`` is given.

    ``normalize`` chooses lm-eval's metric: ``"none"`` is ``acc`` (summed log-probability), ``"chars"`` is
    ``acc_norm`` (divided by ``len(choice)``, the choice's characters without the delimiter), ``"tokens"``
    divides by the number of continuation tokens. The prediction is the argmax of the normalised scores
    (ties to the lowest index); those scores are the result's ``choice_logprobs``, which the ``mean_prob``
    ensemble and the vote's tie-break use.

    Tokens are encoded without special tokens. lm-eval's ``HFLM`` keeps the tokenizer's default, so for a
    tokenizer that adds a BOS (Llama-style) it conditions on one more token; put the BOS text in
    ``few_shot_prefix`` to match it there.

    Under ``torch.distributed`` the examples are split across ranks and the results gathered back in
    order; every rank must call :meth:`evaluate` (it runs collectives).

    The model is evaluated in eval mode without gradients; every submodule's train/eval flag, the grad
    mode and the random generators are restored after.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask
        >>> class Chars:  # one token per character
        ...     pad_token_id = 0
        ...     def encode(self, text):
        ...         return [ord(c) for c in text]
        ...     def decode(self, ids):
        ...         return "".join(map(chr, ids))
        >>> examples = [{"context": "2+2=", "choices": ["4", "5"], "label": 0}]
        >>> task = MultipleChoiceTask("arith", examples, Chars(), target_delimiter="")
        >>> model = torch.nn.Embedding(128, 128)  # the next-token logits are the last token's row
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        ...     model.weight[ord("="), ord("4")] = 5.0
        >>> result = task.evaluate(model)
        >>> result.outputs, result.correct
        ([0], [1.0])
    """

    kind = "multiple_choice"
    metric = "accuracy"

    def __init__(
        self,
        name: str,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        normalize: str = "none",
        few_shot_prefix: str = "",
        target_delimiter: str = " ",
        batch_size: int = 16,
        max_length: int | None = None,
        pad_token_id: int | None = None,
        example_ids: Sequence | None = None,
        show_progress: bool = True,
    ):
        """
        Args:
            name: the task's name in logged keys and file names.
            examples: ``{"context", "choices", "label"}`` dicts, at least one.
            tokenizer: a Hugging Face tokenizer, or anything with ``encode(text) -> list[int]``.
            normalize: ``"none"`` (lm-eval ``acc``), ``"chars"`` (lm-eval ``acc_norm``) or ``"tokens"``.
            few_shot_prefix: text prepended to every context (e.g. the few-shot examples).
            target_delimiter: text between the context and each choice (lm-eval's default is a space).
            batch_size: (example, choice) requests per forward pass.
            max_length: the model's context window; longer inputs lose tokens on the left. ``None``
                feeds every input whole.
            pad_token_id: the id to right-pad batches with; default the tokenizer's pad token.
            example_ids: one JSON-serialisable, unique id per example; default ``0..n-1``.
            show_progress: a progress bar on rank 0 for evaluations longer than a couple of seconds.
        """
        self.name = validate_task_name(name)
        where = f"task {name!r}"
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"{where}: normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
        for setting, value in (("few_shot_prefix", few_shot_prefix), ("target_delimiter", target_delimiter)):
            if not isinstance(value, str):
                raise TypeError(f"{where}: {setting} must be a string, got {type(value).__name__}")
        batch_size = require_int("batch_size", batch_size, 1, where=where)
        max_length = require_int("max_length", max_length, 1, optional=True, where=where)
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(
                f"{where}: the tokenizer must have an encode(text) method (a Hugging Face tokenizer, for "
                f"example), got {type(tokenizer).__name__}"
            )
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
            raise TypeError(f"{where}: examples must be a list of dicts, got {type(examples).__name__}")
        if not examples:
            raise ValueError(f"{where}: examples is empty; a task needs at least one example")
        self.normalize = normalize
        self.few_shot_prefix = few_shot_prefix
        self.target_delimiter = target_delimiter
        self.batch_size = batch_size
        self.show_progress = bool(show_progress)
        self.max_length = max_length
        self.pad_token_id = resolve_pad_token_id(tokenizer, self.name, pad_token_id)
        self.tokenizer = tokenizer

        self.contexts: list[str] = []
        self.choices: list[list[str]] = []
        self.labels: list[int] = []
        for index, example in enumerate(examples):
            context, choices, label = _check_example(where, index, example)
            self.contexts.append(context)
            self.choices.append(choices)
            self.labels.append(label)

        # Tokenised once here (the tokenizer does not change between snapshots): per example and
        # choice, the model's input ids and the continuation ids scored at its last positions.
        self._inputs: list[list[list[int]]] = []
        self._continuations: list[list[list[int]]] = []
        self._divisors: list[list[float]] = []
        for index, (context, choices) in enumerate(zip(self.contexts, self.choices, strict=True)):
            inputs, continuations, divisors = [], [], []
            for choice_index, choice in enumerate(choices):
                context_ids, continuation_ids = self._encode_pair(
                    few_shot_prefix + context, target_delimiter + choice, index
                )
                if not continuation_ids:
                    raise ValueError(
                        f"{where}: example {index}, choice {choice_index} ({choice!r}) tokenizes to nothing "
                        f"after the context; there is nothing to score"
                    )
                if max_length is not None and len(continuation_ids) > max_length:
                    raise ValueError(
                        f"{where}: example {index}, choice {choice_index} has {len(continuation_ids)} "
                        f"continuation tokens, more than max_length={max_length}"
                    )
                if normalize == "chars" and not choice:
                    raise ValueError(
                        f"{where}: example {index}, choice {choice_index} is empty; normalize='chars' "
                        "divides by the number of characters of the choice"
                    )
                whole = context_ids + continuation_ids
                if max_length is not None:
                    whole = whole[-(max_length + 1) :]
                inputs.append(whole[:-1])
                continuations.append(continuation_ids)
                divisors.append(
                    1.0
                    if normalize == "none"
                    else float(len(choice) if normalize == "chars" else len(continuation_ids))
                )
            self._inputs.append(inputs)
            self._continuations.append(continuations)
            self._divisors.append(divisors)

        self.example_ids = validate_example_ids(name, example_ids, len(self.labels))

    def _encode_pair(self, context: str, continuation: str, index: int) -> tuple[list[int], list[int]]:
        """lm-eval's split of a (context, continuation) request into token ids, for a causal LM."""
        if context == "":
            # lm-eval's loglikelihood conditions an empty context on its prefix token (BOS, else EOS),
            # or on the continuation's own first token when that already is the prefix token.
            prefix = getattr(self.tokenizer, "bos_token_id", None)
            if prefix is None:
                prefix = getattr(self.tokenizer, "eos_token_id", None)
            if prefix is None:
                raise ValueError(
                    f"task {self.name!r}: example {index} has an empty context and the tokenizer has "
                    "neither a BOS nor an EOS token to condition on; give a context or a few_shot_prefix"
                )
            continuation_ids = encode(self.tokenizer, continuation)
            if continuation_ids and continuation_ids[0] == prefix:
                return continuation_ids[:1], continuation_ids[1:]
            return [int(prefix)], continuation_ids
        # Trailing whitespace belongs to the continuation, and the pair is encoded whole: BPE merges a
        # leading space into the next word, so encoding the two halves apart gives other tokens.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            raise ValueError(
                f"task {self.name!r}: example {index} has a context of only whitespace; nothing to "
                "condition on (lm-eval refuses it too)"
            )
        whole = encode(self.tokenizer, context + continuation)
        context_ids = encode(self.tokenizer, context)
        return context_ids, whole[len(context_ids) :]

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        shard = shard_examples(len(self.labels))
        # Requests of this rank's padded share as (slot in the share, choice), longest input first as
        # lm-eval orders them: each batch holds inputs of similar length, so right padding stays small.
        requests = [
            (slot, choice)
            for slot, index in enumerate(shard.indices)
            for choice in range(len(self.choices[index]))
        ]
        requests.sort(key=lambda r: -len(self._inputs[shard.indices[r[0]]][r[1]]))
        batches = [requests[k : k + self.batch_size] for k in range(0, len(requests), self.batch_size)]
        # Equal example shares still differ in their number of choices, hence of batches. Every rank must
        # run the same number of forward passes (a sharded model's forward is a collective), so agree on
        # the largest batch count once up front (one collective per evaluation rather than an "anyone
        # left?" exchange per batch) and let ranks with fewer batches run one-row dummy forwards, whose
        # outputs are dropped: cheaper than padding with full batches of dummy requests.
        total_batches = max_over_ranks(len(batches))
        scores: list[list[float]] = [[0.0] * len(self.choices[index]) for index in shard.indices]
        with (
            isolated_evaluation(model),
            progress(total_batches, self.name, enabled=self.show_progress) as bar,
        ):
            for number in range(total_batches):
                bar.update()
                if number < len(batches):
                    batch = batches[number]
                    for (slot, choice), value in zip(
                        batch, self._summed_logprobs(model, shard.indices, batch), strict=True
                    ):
                        index = shard.indices[slot]
                        scores[slot][choice] = value / self._divisors[index][choice]
                else:
                    self._summed_logprobs(model, shard.indices, requests[-1:])
        local = []
        for row in scores:
            # Ties go to the lowest index, as numpy's argmax in lm-eval does.
            local.append((max(range(len(row)), key=lambda c: (row[c], -c)), row))
        gathered = gather_in_order(local, shard)
        outputs = [output for output, _ in gathered]
        return TaskResult(
            outputs=outputs,
            correct=self.score(outputs),
            targets=list(self.labels),
            example_ids=list(self.example_ids),
            choice_logprobs=[row for _, row in gathered],
        )

    def _summed_logprobs(
        self, model: torch.nn.Module, indices: list[int], batch: list[tuple[int, int]]
    ) -> list[float]:
        """Summed log-probability of each request's continuation, from one right-padded forward pass."""
        inputs = [self._inputs[indices[slot]][choice] for slot, choice in batch]
        ids, mask = right_pad(inputs, self.pad_token_id)
        logits = causal_logits(model, ids, mask, self.name)
        sums = []
        for row, (slot, choice) in enumerate(batch):
            continuation = self._continuations[indices[slot]][choice]
            end = len(inputs[row])
            # Positions end-len..end-1 predict the continuation tokens; the padding after them cannot
            # reach them in a causal model. float64 so the sum does not depend on the batch.
            picked = logits[row, end - len(continuation) : end].double().log_softmax(dim=-1)
            target = torch.tensor(continuation, dtype=torch.long, device=picked.device)
            sums.append(picked.gather(-1, target.unsqueeze(-1)).sum())
        return torch.stack(sums).tolist()

    def score(self, outputs: Sequence) -> list[float]:
        if len(outputs) != len(self.labels):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.labels)} examples")
        return [1.0 if output == label else 0.0 for output, label in zip(outputs, self.labels, strict=True)]

    def __repr__(self) -> str:
        return (
            f"MultipleChoiceTask(name={self.name!r}, examples={len(self.labels)}, "
            f"normalize={self.normalize!r})"
        )


def _check_example(where: str, index: int, example: Any) -> tuple[str, list[str], int]:
    if not isinstance(example, Mapping):
        raise TypeError(f"{where}: example {index} must be a dict, got {type(example).__name__}")
    for key in ("context", "choices", "label"):
        if key not in example:
            raise ValueError(
                f"{where}: example {index} has no {key!r}; examples need 'context', 'choices' and 'label'"
            )
    context, choices, label = example["context"], example["choices"], example["label"]
    if not isinstance(context, str):
        raise TypeError(f"{where}: example {index}: context must be a string, got {type(context).__name__}")
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise TypeError(
            f"{where}: example {index}: choices must be a list of strings, got {type(choices).__name__}"
        )
    if not choices:
        raise ValueError(f"{where}: example {index} has no choices")
    for choice_index, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise TypeError(
                f"{where}: example {index}, choice {choice_index} must be a string, "
                f"got {type(choice).__name__}"
            )
    if not is_int(label):
        raise TypeError(f"{where}: example {index}: label must be an integer, got {label!r}")
    if not 0 <= int(label) < len(choices):
        raise ValueError(
            f"{where}: example {index}: label {int(label)} is out of range for {len(choices)} choices"
        )
    return context, list(choices), int(label)
