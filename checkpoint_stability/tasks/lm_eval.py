"""LmEvalTask: an lm-evaluation-harness task, evaluated per example on the live model.

lm-eval is an optional extra: this module imports it only when an ``LmEvalTask`` is constructed, so
``import checkpoint_stability.tasks.lm_eval`` works without it.

What the adapter does differently from calling ``lm_eval.simple_evaluate`` in a training loop, and why:

- It calls ``lm_eval.evaluator.evaluate`` on task objects loaded once at construction, from a
  ``TaskManager`` that indexes only the directories the task needs (indexing every built-in task
  takes seconds), instead of ``simple_evaluate``, which re-seeds python's, numpy's and torch's global
  RNGs (seeds 0 / 1234 / 1234 by default), reloads the task and its dataset, and collects environment
  information on every call. The global RNG states, the train/eval flags and the grad mode are restored
  after every evaluation anyway.
- The few-shot sampler's RNG is re-seeded before every evaluation: the harness's sampler draws from one
  ``random.Random`` in document order, so without that every checkpoint would see different prompts.
- A Hugging Face ``PreTrainedModel`` runs through lm-eval's own ``HFLM`` with ``batch_size`` given to it
  (``simple_evaluate``'s ``batch_size`` is ignored when it gets a model object). ``HFLM`` calls
  ``model.eval()`` and ``model.tie_weights()`` when it is built; the modes are restored afterwards and
  ``tie_weights`` is not called (it would re-tie an untied output layer: a change of weights).
- Any other ``torch.nn.Module`` returning next-token logits runs through a small ``TemplateLM``
  (greedy generation only).
- Under ``torch.distributed``, ``HFLM`` with a model object is single-process: every rank would evaluate
  every document. Instead every rank builds all the requests (prompts are cheap, and then identical to a
  single-process run, few-shot examples included), the requests are cut into batches the same way in any
  number of processes, and each rank runs an equal share of the batches (padded with a repeat); the
  answers are gathered back in order and the harness scores every document on every rank. The result is
  bit-identical to a run in one process. (The harness's own ``samples={task: [doc ids]}`` restriction
  was not used: it keeps a set of documents in dataset order, so a share cannot be padded with repeats;
  the few-shot prompts it builds depend on which documents a rank holds; and an empty list means "all
  documents".)
- Batches are made by the adapter (sorted by length, ``batch_size`` requests each, one model call per
  batch), not by ``HFLM`` over the whole request list, so log-likelihoods can differ from a plain
  ``simple_evaluate`` run in the last float32 bits (a batch's padding changes the kernels' rounding).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from checkpoint_stability.isolation import isolated_evaluation
from checkpoint_stability.tasks.base import TaskResult, plain_value, validate_task_name
from checkpoint_stability.tasks.language_model import causal_logits, encode, right_pad
from checkpoint_stability.tasks.sharding import any_rank_true, gather_in_order, rank_and_world, shard_examples
from checkpoint_stability.validation import is_int, is_real, require_int

INSTALL_HINT = "LmEvalTask needs lm-evaluation-harness: pip install checkpoint-stability[lm-eval]"

# Multiple-choice metrics whose per-document value is "the argmax choice equals the label", and what the
# harness divides each choice's log-likelihood by before taking that argmax.
MULTIPLE_CHOICE_METRICS = {"acc": "none", "acc_norm": "characters", "acc_bytes": "bytes"}
OUTPUT_TYPES = ("multiple_choice", "generate_until")
# Where a causal module may say how long a sequence it takes.
MAX_LENGTH_ATTRIBUTES = ("max_length", "max_seq_len", "block_size", "context_length", "n_positions")
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


def _import_lm_eval():
    try:
        import lm_eval.evaluator
        import lm_eval.tasks  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return sys.modules["lm_eval"]


class LmEvalTask:
    """One lm-evaluation-harness task: per-example outputs of the live model, at every snapshot.

    ``harness_task`` is an lm-eval task name, either a built-in one or one defined in a YAML file under
    ``include_path`` (a directory, or a list of them), or the path of a task YAML. Only the directories
    the task needs are indexed, once, at construction (see ``restricted_task_manager``); the task and its
    dataset are loaded once too. Multiple-choice and ``generate_until`` tasks are supported; a group is
    refused (make one ``LmEvalTask`` per subtask).

    Per example (a harness document, ``example_ids`` = its ``doc_id``):

    - multiple choice: the output is the index of the chosen answer, the argmax of the per-choice
      log-likelihoods after the normalisation of ``metric`` (``acc``: none; ``acc_norm``: divided by the
      choice's length in characters; ``acc_bytes``: in UTF-8 bytes), as the harness computes it;
      ``choice_logprobs`` holds those normalised log-likelihoods; the target is the label index (a list of
      indices for multi-target tasks).
    - generation: the output is the generated string after the task's filter (the first filter pipeline,
      or the one named as ``metric="exact_match,<filter>"``); the target is the reference string.

    ``correct`` is the harness's own per-document value of ``metric`` (default: the first metric of the
    task's ``metric_list``), which must be averaged over documents (aggregation ``mean``) and lie in
    [0, 1]; so ``TaskResult.score`` is the harness's reported score for that metric.

    ``score(outputs)`` re-scores any outputs (e.g. an ensemble's vote) against this task's documents:
    multiple choice by equality with the label index, which is exactly ``acc`` / ``acc_norm`` /
    ``acc_bytes`` for an output chosen under that normalisation; generation through the harness's own
    ``process_results`` on the filtered string, so the metric's normalisation (``ignore_case``,
    ``regexes_to_ignore``...) applies exactly as in the harness. Limits: metrics that are not a mean of
    per-document values in [0, 1] (``f1``, ``mcc``, ``bleu``, perplexities) are refused, and so are
    multiple-choice metrics that do not follow from the chosen index (``exact_match`` on a
    multiple-choice task uses greedy decoding of the gold answer; ``brier_score`` needs probabilities).
    Votes on generation compare the filtered strings as they are, before the metric's normalisation.
    A report that re-scores from the run directory alone has only the stored targets, not the harness's
    normalisation: for generation it can only compare strings exactly.

    ``tokenizer``: a Hugging Face tokenizer (required for a model that is not a ``PreTrainedModel``,
    which must then map token ids to next-token logits; without one, a ``PreTrainedModel``'s tokenizer is
    loaded from its ``name_or_path``). ``num_fewshot`` overrides the task's, as ``simple_evaluate`` does
    (a task configured with 0 shots stays at 0). ``limit`` keeps the first documents (a number < 1 is a
    fraction). ``batch_size`` goes to the model wrapper. ``seed`` seeds the few-shot sampler before every
    evaluation (``None``: lm-eval's default, 1234, as in ``simple_evaluate``). ``progress`` shows
    lm-eval's progress bars and log messages, which are quiet by default.

    Under ``torch.distributed`` every rank runs an equal share of the batches and all ranks return the
    same result, bit-identical to a single-process run. Log-likelihood batches are one forward pass each,
    so every rank makes the same number; generation with a plain module steps every rank together until
    all are done, but ``HFLM``'s generation (Hugging Face ``generate``) stops when its own batch is done,
    so a model whose forward pass is itself collective (FSDP) cannot run generation tasks through it, and
    rolling log-likelihoods (perplexity tasks, not supported here anyway) would split unevenly.

    Example (needs lm-eval and a task YAML in ``my_tasks/``)::

        task = LmEvalTask("arith", "my_arith", tokenizer=tokenizer, include_path="my_tasks/")
        monitor = StabilityMonitor([task], dirpath="run/stability", window=5)
    """

    def __init__(
        self,
        name: str,
        harness_task: str,
        *,
        tokenizer: Any = None,
        include_path: str | Path | Sequence[str | Path] | None = None,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        metric: str | None = None,
        seed: int | None = None,
        progress: bool = False,
    ):
        self.name = validate_task_name(name)
        if not isinstance(harness_task, str) or not harness_task.strip():
            raise ValueError(
                f"task {name!r}: harness_task must be an lm-eval task name, got {harness_task!r}"
            )
        where = f"task {name!r}"
        batch_size = require_int("batch_size", batch_size, 1, where=where)
        num_fewshot = require_int("num_fewshot", num_fewshot, 0, optional=True, where=where)
        if limit is not None and (not is_real(limit) or limit <= 0):
            raise ValueError(f"task {name!r}: limit must be None or a number > 0, got {limit!r}")
        seed = require_int("seed", seed, optional=True, where=where)
        lm_eval = _import_lm_eval()
        from lm_eval.defaults import DEFAULT_OTHER_SEED
        from lm_eval.evaluator_utils import get_sample_size

        self.harness_task = harness_task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = DEFAULT_OTHER_SEED if seed is None else seed
        self.progress = bool(progress)
        self.task_manager = restricted_task_manager(harness_task, include_path)
        with self._quiet():
            try:
                loaded = self.task_manager.load([harness_task])
            except KeyError as error:
                raise ValueError(
                    f"task {name!r}: lm-eval knows no task {harness_task!r}"
                    + (f" (searched {include_path} and the built-in tasks)" if include_path else "")
                ) from error
        tasks = loaded["tasks"]
        if len(tasks) != 1 or loaded.get("groups"):
            raise ValueError(
                f"task {name!r}: {harness_task!r} is a group or tag of {len(tasks)} tasks "
                f"({sorted(tasks)[:5]}...); make one LmEvalTask per subtask"
            )
        self._loaded = loaded
        self._task_name, self._harness = next(iter(tasks.items()))
        task = self._harness
        if task.OUTPUT_TYPE not in OUTPUT_TYPES:
            raise ValueError(
                f"task {name!r}: lm-eval task {harness_task!r} has output_type {task.OUTPUT_TYPE!r}; "
                f"supported are {list(OUTPUT_TYPES)}"
            )
        self.kind = "multiple_choice" if task.OUTPUT_TYPE == "multiple_choice" else "generation"
        # The same per-task overrides as simple_evaluate.
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)
        self.num_fewshot = task.get_config("num_fewshot")
        self.metric, self.filter = self._resolve_metric(metric)

        self._limit = get_sample_size(task, limit)
        self._docs = list(task.doc_iterator(limit=self._limit))
        if not self._docs:
            raise ValueError(f"task {name!r}: lm-eval task {harness_task!r} has no documents")
        self.example_ids = [int(doc_id) for doc_id, _ in self._docs]
        if self.kind == "multiple_choice":
            self.targets = [plain_value(self._gold(doc)) for _, doc in self._docs]
            self._normalisers = [self._normaliser(doc) for _, doc in self._docs]
        else:
            self.targets = [plain_value(task.doc_to_target(doc)) for _, doc in self._docs]
        self._lm_eval_version = getattr(lm_eval, "__version__", "?")

    # ------------------------------------------------------------------ construction helpers

    def _resolve_metric(self, metric: str | None) -> tuple[str, str]:
        task = self._harness
        available = list(task._metric_fn_list)
        filters = [f.name for f in task._filters]
        if metric is None:
            chosen, filter_name = available[0], filters[0]
        else:
            chosen, _, filter_name = str(metric).partition(",")
            filter_name = filter_name or filters[0]
        if chosen not in available:
            raise ValueError(
                f"task {self.name!r}: metric {chosen!r} is not one of the task's metrics {available}"
            )
        if filter_name not in filters:
            raise ValueError(
                f"task {self.name!r}: filter {filter_name!r} is not one of the task's filters {filters}"
            )
        if self.kind == "multiple_choice" and chosen not in MULTIPLE_CHOICE_METRICS:
            raise ValueError(
                f"task {self.name!r}: metric {chosen!r} does not follow from the chosen answer; "
                f"choose one of {sorted(m for m in MULTIPLE_CHOICE_METRICS if m in available)}"
            )
        aggregation = task.aggregation().get(chosen)
        if getattr(aggregation, "__name__", None) != "mean":
            raise ValueError(
                f"task {self.name!r}: metric {chosen!r} is aggregated with "
                f"{getattr(aggregation, '__name__', aggregation)!r}, not a mean of per-example scores"
            )
        return chosen, filter_name

    def _gold(self, doc):
        """The label as the harness's process_results computes it: an index (or indices), -100 if invalid."""
        task = self._harness
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, list):
            return [int(i) if i < len(choices) else -100 for i in gold]
        if isinstance(gold, str):
            return choices.index(gold) if gold in choices else -100
        return int(gold) if gold < len(choices) else -100

    def _normaliser(self, doc) -> list[float]:
        choices = self._harness.doc_to_choice(doc)
        kind = MULTIPLE_CHOICE_METRICS[self.metric]
        if kind == "characters":
            return [float(len(c)) for c in choices]
        if kind == "bytes":
            return [float(len(c.encode("utf-8"))) for c in choices]
        return [1.0] * len(choices)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Keep lm-eval's log lines and its request-building progress bar out of a training log."""
        if self.progress:
            yield
            return
        import lm_eval.api.task as harness_task_module

        root = logging.getLogger("lm_eval")
        level = root.level
        bar = getattr(harness_task_module, "tqdm", None)
        root.setLevel(logging.ERROR)
        if bar is not None:
            harness_task_module.tqdm = functools.partial(bar, disable=True)
        try:
            yield
        finally:
            root.setLevel(level)
            if bar is not None:
                harness_task_module.tqdm = bar

    # ------------------------------------------------------------------ the Task protocol

    def evaluate(self, model: torch.nn.Module) -> TaskResult:
        from lm_eval.evaluator import evaluate

        with isolated_evaluation(model), self._quiet():
            lm = _batched_lm_class()(
                self._language_model(model), batch_size=self.batch_size, progress=self.progress
            )
            self._harness.set_fewshot_seed(seed=self.seed)
            results = evaluate(
                lm=lm,
                task_dict=self._loaded,
                limit=self._limit,
                bootstrap_iters=0,
                log_samples=True,
            )
        samples = {
            s["doc_id"]: s for s in results["samples"][self._task_name] if s.get("filter") == self.filter
        }
        missing = [i for i in self.example_ids if i not in samples]
        if missing:
            raise RuntimeError(f"task {self.name!r}: lm-eval returned no samples for documents {missing[:5]}")
        outputs: list[Any] = []  # choice indices (multiple choice) or strings (generation)
        correct: list[float] = []
        logprobs: list[list[float]] = []
        for index, doc_id in enumerate(self.example_ids):
            sample = samples[doc_id]
            correct.append(float(sample[self.metric]))
            if self.kind == "multiple_choice":
                normaliser = self._normalisers[index]
                lls = [float(r[0]) for r in sample["filtered_resps"][: len(normaliser)]]
                row = [ll / n for ll, n in zip(lls, normaliser, strict=True)]
                choice = max(range(len(row)), key=row.__getitem__)  # first maximum, as np.argmax
                if float(_matches(choice, self.targets[index])) != correct[-1]:
                    raise RuntimeError(
                        f"task {self.name!r}: document {doc_id}: chosen answer {choice} disagrees with the "
                        f"harness's {self.metric}={correct[-1]} (lm-eval {self._lm_eval_version})"
                    )
                outputs.append(choice)
                logprobs.append(row)
            else:
                output = plain_value(sample["filtered_resps"][0])
                if not isinstance(output, str):
                    raise ValueError(
                        f"task {self.name!r}: filter {self.filter!r} gives {type(output).__name__} outputs; "
                        "a generation task needs one string per document (end the filter with take_first)"
                    )
                outputs.append(output)
        return TaskResult(
            outputs=outputs,
            correct=correct,
            targets=list(self.targets),
            example_ids=list(self.example_ids),
            choice_logprobs=logprobs if self.kind == "multiple_choice" else None,
        )

    def score(self, outputs: Sequence) -> list[float]:
        if len(outputs) != len(self.targets):
            raise ValueError(f"task {self.name!r}: {len(outputs)} outputs for {len(self.targets)} examples")
        if self.kind == "multiple_choice":
            return [float(_matches(o, t)) for o, t in zip(outputs, self.targets, strict=True)]
        task = self._harness
        return [
            float(task.process_results(doc, [output])[self.metric])
            for (_, doc), output in zip(self._docs, outputs, strict=True)
        ]

    def __repr__(self) -> str:
        return (
            f"LmEvalTask(name={self.name!r}, harness_task={self.harness_task!r}, "
            f"examples={len(self.example_ids)}, metric={self.metric!r})"
        )

    # ------------------------------------------------------------------ model wrappers

    def _language_model(self, model: torch.nn.Module):
        """lm-eval's HFLM for a Hugging Face model, the module wrapper for anything else."""
        transformers = sys.modules.get("transformers")
        if transformers is not None and isinstance(model, transformers.PreTrainedModel):
            from lm_eval.models.huggingface import HFLM

            with _no_tie_weights(model):
                return HFLM(
                    pretrained=model,
                    tokenizer=self.tokenizer,
                    batch_size=self.batch_size,
                )
        if self.tokenizer is None:
            raise ValueError(
                f"task {self.name!r}: a model that is not a Hugging Face PreTrainedModel needs tokenizer="
            )
        return _module_lm_class()(model, self.tokenizer, batch_size=self.batch_size, task=self.name)


def restricted_task_manager(harness_task: str, include_path=None):
    """A ``TaskManager`` indexing only what ``harness_task`` needs: indexing all built-in tasks takes seconds.

    With ``include_path``, the user's directories alone (``include_defaults=False``). If the task is not
    there, also the built-in directories found by a text search of lm-eval's YAML files (a fraction of a
    second): first those whose top-level ``task:`` or ``group:`` is the name, then those that mention it
    at all (tags are defined by their members). A name no built-in YAML mentions is not a built-in task:
    the manager returned then simply does not know it. Only a name that is mentioned but still not found
    costs the whole index.
    """
    _import_lm_eval()
    import lm_eval.tasks

    manager_class = lm_eval.tasks.TaskManager
    paths = [] if include_path is None else _as_paths(include_path)
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"include_path {str(path)!r} is not a directory")
    if harness_task.endswith((".yaml", ".yml")) and Path(harness_task).is_file():
        return manager_class(include_path=paths or None, include_defaults=False)
    if paths:
        manager = manager_class(include_path=paths, include_defaults=False)
        if harness_task in manager.task_index:
            return manager
    defining, mentioning = built_in_task_dirs(harness_task)
    if not mentioning:
        return manager if paths else manager_class(include_path=None, include_defaults=False)
    for dirs in (defining, mentioning):
        if dirs:
            manager = manager_class(include_path=[*dirs, *paths], include_defaults=False)
            if harness_task in manager.task_index:
                return manager
    return manager_class(include_path=paths or None)


def built_in_task_dirs(harness_task: str) -> tuple[list[Path], list[Path]]:
    """Built-in task directories with a YAML file defining ``harness_task``, and those mentioning it."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    name = re.escape(harness_task)
    defines = re.compile(rf"^(task|group)\s*:\s*['\"]?{name}['\"]?\s*(#.*)?$", re.MULTILINE)
    mentions = re.compile(rf"(?<![\w.-]){name}(?![\w.-])")
    defining, mentioning = set(), set()
    for path in root.rglob("*.yaml"):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if harness_task not in text or not mentions.search(text):
            continue
        mentioning.add(path.parent)
        if defines.search(text):
            defining.add(path.parent)
    return sorted(defining), sorted(mentioning)


def _as_paths(include_path) -> list[Path]:
    if isinstance(include_path, (str, Path)):
        return [Path(include_path)]
    return [Path(p) for p in include_path]


def _matches(output, target) -> bool:
    return output in target if isinstance(target, list) else output == target


@contextlib.contextmanager
def _no_tie_weights(model: torch.nn.Module) -> Iterator[None]:
    """Keep HFLM's constructor from re-tying an untied output layer (it calls ``model.tie_weights()``)."""
    own = vars(model)
    had, previous = "tie_weights" in own, own.get("tie_weights")
    object.__setattr__(model, "tie_weights", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, "tie_weights", previous)
        else:
            object.__delattr__(model, "tie_weights")


# What the batcher sorts each request type by (longest first, as HFLM does, so batches pad little).
REQUEST_LENGTH = {
    "loglikelihood": lambda args: len(args[0]) + len(args[1]),
    "loglikelihood_rolling": lambda args: len(args[0]),
    "generate_until": lambda args: len(args[0]),
}


@functools.cache
def _batched_lm_class():
    from lm_eval.api.model import LM

    class BatchedLM(LM):
        """Makes the batches itself, the same in every process, and gives each rank an equal share of them.

        Requests are sorted by length (longest first, stable) and cut into batches of ``batch_size``;
        ``inner`` gets one call per batch, so each batch is one forward pass (one ``generate``) whatever
        the number of processes. The batches are dealt round-robin to the ranks, padded with a repeat so
        that every rank runs as many as the others, and the answers are gathered back into request order.
        Because a batch's numbers depend on its composition (padding changes the kernels' blocking), this
        is what makes a run on N processes give bit-identical results to a run on one.

        To the harness it is one process (rank 0 of 1): it builds and scores every document on every
        rank; only the model calls are split.
        """

        def __init__(self, inner, *, batch_size: int, progress: bool):
            super().__init__()
            self.inner = inner
            self.batch_size = batch_size
            self.progress = progress

        def _run(self, method: str, requests: list) -> list:
            length = REQUEST_LENGTH[method]
            order = sorted(range(len(requests)), key=lambda i: -length(requests[i].args))
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rank, world = rank_and_world()
            dealt = [b for r in range(world) for b in range(r, len(batches), world)]
            shard = shard_examples(len(dealt), rank, world)
            call = getattr(self.inner, method)
            mine = shard.indices
            if self.progress:
                from tqdm import tqdm

                mine = tqdm(mine, desc=f"{method} batches", disable=rank != 0)
            local = [call([requests[i] for i in batches[dealt[j]]], disable_tqdm=True) for j in mine]
            results: list = [None] * len(requests)
            for batch, answers in zip(dealt, gather_in_order(local, shard), strict=True):
                for index, answer in zip(batches[batch], answers, strict=True):
                    results[index] = answer
            return results

        def loglikelihood(self, requests):
            return self._run("loglikelihood", requests)

        def loglikelihood_rolling(self, requests):
            return self._run("loglikelihood_rolling", requests)

        def generate_until(self, requests):
            return self._run("generate_until", requests)

    return BatchedLM


@functools.cache
def _module_lm_class():
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    class CausalModuleLM(TemplateLM):
        """lm-eval's view of a causal ``torch.nn.Module`` that maps token ids to next-token logits.

        Requests are run in batches of ``batch_size`` in the order given (no reordering, no merging), so
        equal shares make equal numbers of forward passes. Generation is greedy only; under
        ``torch.distributed`` every rank takes the same number of generation steps.
        """

        def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int, task: str):
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            self.batch_size = batch_size
            self.task = task
            self.max_length = _max_length(model)
            self.pad_id = (
                tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
            )
            if getattr(tokenizer, "eos_token_id", None) is None:
                raise ValueError(f"task {task!r}: the tokenizer has no eos_token_id, which lm-eval needs")

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eos_token_id)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return encode(self.tokenizer, string)

        def _logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            results = []
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[start : start + self.batch_size]
                inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in batch]
                ids, mask = right_pad(inputs, self.pad_id)
                logits = causal_logits(self.model, ids, mask, self.task).float().log_softmax(-1).cpu()
                for row, ((_, cont), tokens) in enumerate(zip(batch, inputs, strict=True)):
                    end = len(tokens)
                    scored = logits[row, end - len(cont) : end]
                    target = torch.tensor(cont, dtype=torch.long)
                    picked = scored.gather(1, target.unsqueeze(1)).squeeze(1)
                    results.append((float(picked.sum()), bool((scored.argmax(-1) == target).all())))
            return results

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self._logprobs([(list(ctx), list(cont)) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for request in requests:
                windows = [
                    lm_utils.make_disjoint_window(window)
                    for window in lm_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(request.args[0]),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    )
                ]
                totals.append(math.fsum(ll for ll, _ in self._logprobs(windows)))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = self.tokenizer.decode([self.eot_token_id])
            out = []
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start : start + self.batch_size]
                settings = []
                for request in batch:
                    context, gen_kwargs = request.args
                    kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
                    if kwargs.get("do_sample"):
                        raise ValueError(
                            f"task {self.task!r}: only greedy generation is supported for plain modules"
                        )
                    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                    settings.append((context, until, int(kwargs["max_gen_toks"])))
                out.extend(self._greedy(settings))
            return out

        def _greedy(self, settings: list[tuple[str, list[str], int]]) -> list[str]:
            prompts = []
            for context, _, max_gen_toks in settings:
                room = max(1, self.max_length - max_gen_toks)
                prompts.append(self.tok_encode(context)[-room:])
            generated: list[list[int]] = [[] for _ in settings]
            done = [False] * len(settings)
            # Every rank steps until every rank is done, so a collective forward pass cannot hang.
            while any_rank_true(not all(done)):
                sequences = [(p + g)[-self.max_length :] for p, g in zip(prompts, generated, strict=True)]
                ids, mask = right_pad(sequences, self.pad_id)
                logits = causal_logits(self.model, ids, mask, self.task)
                for row, sequence in enumerate(sequences):
                    if done[row]:
                        continue
                    token = int(logits[row, len(sequence) - 1].argmax())
                    generated[row].append(token)
                    _, until, max_gen_toks = settings[row]
                    text = self.tokenizer.decode(generated[row])
                    stop = [s for s in until if s]
                    if (
                        token == self.eot_token_id
                        or len(generated[row]) >= max_gen_toks
                        or any(s in text for s in stop)
                    ):
                        done[row] = True
            return [
                postprocess_generated_text(self.tokenizer.decode(g), stop=until, think_end_token=None)
                for g, (_, until, _) in zip(generated, settings, strict=True)
            ]

    return CausalModuleLM


def _max_length(model: torch.nn.Module) -> int:
    for holder in (model, getattr(model, "config", None)):
        for attribute in MAX_LENGTH_ATTRIBUTES:
            value = getattr(holder, attribute, None)
            if is_int(value) and value > 1:
                return int(value)
    return DEFAULT_MAX_LENGTH
