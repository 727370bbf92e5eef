"""GenerationTask: free-form answers by greedy decoding, scored by exact match or character F1."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.metrics import TASK_METRICS
from checkpoint_stability.tasks.base import TaskResult, validate_example_ids, validate_task_name
from checkpoint_stability.tasks.language_model import causal_logits, encode
from checkpoint_stability.tasks.language_model import pad_token_id as resolve_pad_token_id
from checkpoint_stability.tasks.progress import progress
from checkpoint_stability.tasks.sharding import any_rank_true, gather_in_order, shard_examples
from checkpoint_stability.validation import require_int


def default_normalize(text: str) -> str:
    """Strip surrounding whitespace, case-fold, and collapse every internal whitespace run to one space.

    Whitespace is what ``str.split()`` splits on (tabs, newlines, non-breaking spaces...); case-folding
    is ``str.casefold()``, a stronger ``lower()`` (``"ß"`` becomes ``"ss"``).

    >>> default_normalize("  The\\tEiffel \\n TOWER ")
    'the eiffel tower'
    """
    return " ".join(text.split()).casefold()


class GenerationTask:
    """Greedy free-form generation from prompts, scored against reference answers.

    Every example is ``{"prompt": str, "answer": str}``; ``answer`` may also be a non-empty list of
    acceptable answers, and the example's score is then the best score over them (``targets`` holds the
    list). The model sees ``few_shot_prefix + prompt`` and continues it greedily, one token at a time:

    - a continuation ends at the tokenizer's EOS token (not part of the output), as soon as its decoded
      text contains one of the ``stop`` strings, or after ``max_new_tokens`` tokens;
    - the output is the decoded continuation cut before the first stop string, then passed through
      ``normalize`` (default :func:`default_normalize`: strip, case-fold, collapse whitespace; any
      callable ``str -> str``, or ``None`` to keep the raw text). Answers are normalised the same way;
    - ``metric="exact_match"`` scores 1 if the output equals a normalised answer, ``"char_f1"`` the
      character F1 of :func:`checkpoint_stability.metrics.char_f1`.

    Outputs are plain strings, so the window ensemble's vote and the instability score (IS) work on them.

    Any causal LM that maps token ids to logits works (a Hugging Face model or a plain module, see
    :mod:`checkpoint_stability.tasks.language_model`); decoding is done here, not with
    ``model.generate``. Prompts are right-padded in batches of ``batch_size``; rows that finish leave
    the batch. There is no key-value cache: every step runs the model over the whole sequence, which
    is cheap for the short answers this is meant for. Under ``torch.distributed`` the prompts are split
    across ranks and every rank steps the model in lock-step until all ranks are done. The model is
    evaluated in eval mode without gradients; every submodule's train/eval flag, the grad mode and the
    random generators are restored after.

    Example::

        >>> import torch
        >>> from checkpoint_stability.tasks.generation import GenerationTask
        >>> class Chars:  # a toy tokenizer: one token per character, id 0 is EOS and padding
        ...     pad_token_id = eos_token_id = 0
        ...     def encode(self, text):
        ...         return [ord(c) for c in text]
        ...     def decode(self, ids):
        ...         return "".join(map(chr, ids))
        >>> class NextLetter(torch.nn.Module):  # a toy causal LM: always predicts the following letter
        ...     def forward(self, input_ids):
        ...         return torch.nn.functional.one_hot((input_ids + 1) % 128, 128).float()
        >>> examples = [{"prompt": "a", "answer": "BCD"}, {"prompt": "w", "answer": ["xy", "XYZ"]}]
        >>> task = GenerationTask("letters", examples, Chars(), max_new_tokens=3)
        >>> result = task.evaluate(NextLetter())
        >>> result.outputs, result.correct, result.targets
        (['bcd', 'xyz'], [1.0, 1.0], ['bcd', ['xy', 'xyz']])
    """

    kind = "generation"

    def __init__(
        self,
        name: str,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        metric: str = "exact_match",
        max_new_tokens: int = 32,
        stop: Sequence[str] | str | None = ("\n",),
        few_shot_prefix: str = "",
        normalize: Callable[[str], str] | None = default_normalize,
        batch_size: int = 16,
        pad_token_id: int | None = None,
        example_ids: Sequence | None = None,
        show_progress: bool = True,
    ):
        """
        Args:
            name: the task's name in logged keys and file names.
            examples: ``{"prompt": str, "answer": str | list[str]}`` mappings, at least one.
            tokenizer: a Hugging Face tokenizer, or anything with ``encode(text)`` and ``decode(ids)``;
                its ``eos_token_id`` (if any) ends a continuation.
            metric: ``"exact_match"`` or ``"char_f1"``.
            max_new_tokens: the most tokens generated per example (>= 1).
            stop: strings that end a continuation (cut before the first one found); a single string
                is one stop string; ``None`` or ``()`` for none.
            few_shot_prefix: text put before every prompt (e.g. solved examples), tokenised with it.
            normalize: applied to outputs and answers before scoring; ``None`` compares raw text.
            batch_size: prompts decoded together.
            pad_token_id: id used to right-pad batches; default the tokenizer's pad token.
            example_ids: one JSON-serialisable, unique id per example; default ``0..n-1``.
            show_progress: a progress bar on rank 0 for evaluations longer than a couple of seconds.
        """
        self.name = validate_task_name(name)
        if metric not in TASK_METRICS:
            raise ValueError(f"task {name!r}: metric must be one of {sorted(TASK_METRICS)}, got {metric!r}")
        max_new_tokens = require_int("max_new_tokens", max_new_tokens, 1, where=f"task {name!r}")
        batch_size = require_int("batch_size", batch_size, 1, where=f"task {name!r}")
        if not all(callable(getattr(tokenizer, method, None)) for method in ("encode", "decode")):
            raise TypeError(
                f"task {name!r}: the tokenizer must have encode(text) and decode(ids) (a Hugging Face "
                f"tokenizer, for example), got {type(tokenizer).__name__}"
            )
        if normalize is not None and not callable(normalize):
            raise TypeError(f"task {name!r}: normalize must be a callable or None, got {normalize!r}")
        if not isinstance(few_shot_prefix, str):
            raise TypeError(f"task {name!r}: few_shot_prefix must be a string, got {type(few_shot_prefix)}")
        self.stop = _stop_strings(name, stop)
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.show_progress = bool(show_progress)
        self.few_shot_prefix = few_shot_prefix
        self.normalize = normalize
        self.tokenizer = tokenizer
        self.pad_token_id = resolve_pad_token_id(tokenizer, name, pad_token_id)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = None if eos is None else int(eos)
        self._similarity = TASK_METRICS[metric]

        if isinstance(examples, Mapping) or not isinstance(examples, Sequence):
            raise TypeError(f"task {name!r}: examples must be a list of mappings, got {type(examples)}")
        if not examples:
            raise ValueError(f"task {name!r}: examples is empty; a task needs at least one example")
        self.prompts: list[list[int]] = []
        self.targets: list = []
        for index, example in enumerate(examples):
            prompt, answers = _check_example(name, index, example)
            ids = encode(tokenizer, few_shot_prefix + prompt)
            if not ids:
                raise ValueError(f"task {name!r}: example {index} has a prompt that tokenises to nothing")
            self.prompts.append(ids)
            normalized = [self._normalized(answer, f"example {index}'s answer") for answer in answers]
            self.targets.append(normalized if isinstance(example["answer"], list) else normalized[0])
        self.example_ids = validate_example_ids(name, example_ids, len(self.prompts))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        shard = shard_examples(len(self.prompts))
        own = set(range(shard.real))
        outputs: list[str] = []
        batches = range(0, shard.size, self.batch_size)
        with isolated_evaluation(model), progress(len(batches), self.name, enabled=self.show_progress) as bar:
            for start in batches:
                bar.update()
                rows = range(start, min(start + self.batch_size, shard.size))
                # Filler rows only keep the shares equal; they are not decoded (their output is dropped).
                prompts = [self.prompts[shard.indices[row]] if row in own else None for row in rows]
                outputs.extend(self._decode_batch(model, prompts))
        outputs = gather_in_order(outputs, shard)
        return TaskResult(
            outputs=outputs,
            correct=self.score(outputs),
            targets=list(self.targets),
            example_ids=list(self.example_ids),
        )

    def score(self, outputs: Sequence) -> list[float]:
        """Score outputs as given (``evaluate``'s are already normalised) against the normalised answers."""
        if len(outputs) != len(self.targets):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.targets)} targets")
        scores = []
        for output, target in zip(outputs, self.targets, strict=True):
            answers = target if isinstance(target, list) else [target]
            scores.append(max(float(self._similarity(output, answer)) for answer in answers))
        return scores

    def _decode_batch(self, model: torch.nn.Module, prompts: list[list[int] | None]) -> list[str]:
        """Greedy continuations of one batch of prompts (``None``: a filler row, output ``""``)."""
        count = len(prompts)
        lengths = torch.tensor([len(p) if p is not None else 0 for p in prompts], dtype=torch.long)
        # Room for every prompt plus its longest continuation, so the tensor never has to grow.
        ids = torch.full((count, int(lengths.max()) + self.max_new_tokens), self.pad_token_id)
        for row, prompt in enumerate(prompts):
            if prompt is not None:
                ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        generated: list[list[int]] = [[] for _ in range(count)]
        active = [row for row, prompt in enumerate(prompts) if prompt is not None]
        # Every rank must run the same number of forward passes: a sharded model (FSDP, tensor
        # parallel) gathers its weights inside forward with collectives, and a rank that stopped
        # early would leave the others waiting in one forever. So a rank with nothing left to decode
        # keeps running dummy forwards until no rank is still generating.
        while any_rank_true(bool(active)):
            if not active:
                dummy = torch.full((1, 1), self.pad_token_id, dtype=torch.long)
                causal_logits(model, dummy, torch.ones_like(dummy), self.name)
                continue
            rows = torch.tensor(active, dtype=torch.long)
            row_lengths = lengths[rows]
            width = int(row_lengths.max())
            batch = ids[rows, :width]
            mask = (torch.arange(width) < row_lengths[:, None]).long()
            logits = causal_logits(model, batch, mask, self.name)
            last = (row_lengths - 1).to(logits.device)
            picked = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
            still = []
            for row, token in zip(active, picked, strict=True):
                if self.eos_token_id is not None and token == self.eos_token_id:
                    continue
                ids[row, int(lengths[row])] = token
                lengths[row] += 1
                generated[row].append(token)
                if len(generated[row]) < self.max_new_tokens and not self._stopped(generated[row]):
                    still.append(row)
            active = still
        return [
            "" if prompt is None else self._output(tokens)
            for prompt, tokens in zip(prompts, generated, strict=True)
        ]

    def _stopped(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        # The whole continuation is decoded because a stop string may straddle token boundaries.
        text = self.tokenizer.decode(tokens)
        return any(stop in text for stop in self.stop)

    def _output(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens) if tokens else ""
        cuts = [text.find(stop) for stop in self.stop]
        cuts = [cut for cut in cuts if cut >= 0]
        if cuts:
            text = text[: min(cuts)]
        return self._normalized(text, "a generated output")

    def _normalized(self, text: str, what: str) -> str:
        if self.normalize is None:
            return text
        value = self.normalize(text)
        if not isinstance(value, str):
            raise TypeError(
                f"task {self.name!r}: normalize returned {type(value).__name__} for {what}; "
                "it must return a string"
            )
        return value

    def __repr__(self) -> str:
        return (
            f"GenerationTask(name={self.name!r}, examples={len(self.prompts)}, metric={self.metric!r}, "
            f"max_new_tokens={self.max_new_tokens})"
        )


def _stop_strings(name: str, stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for value in stop:
        if not isinstance(value, str) or not value:
            raise ValueError(f"task {name!r}: stop strings must be non-empty strings, got {value!r}")
    return stop


def _check_example(name: str, index: int, example: Any) -> tuple[str, list[str]]:
    if not isinstance(example, Mapping):
        raise TypeError(f"task {name!r}: example {index} must be a mapping, got {type(example).__name__}")
    for key in ("prompt", "answer"):
        if key not in example:
            raise ValueError(f"task {name!r}: example {index} has no {key!r} key")
    prompt, answer = example["prompt"], example["answer"]
    if not isinstance(prompt, str):
        raise TypeError(f"task {name!r}: example {index}'s prompt must be a string, got {type(prompt)}")
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise TypeError(
            f"task {name!r}: example {index}'s answer must be a string or a non-empty list of strings, "
            f"got {answer!r}"
        )
    return prompt, answers
