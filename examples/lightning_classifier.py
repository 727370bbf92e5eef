"""Checkpoint averaging and ensembling inside a Lightning Trainer, on a small classifier.

A three-layer MLP learns a noisy three-armed spiral (two input features, three classes, generated here,
deterministically). The learning rate is deliberately high and the batches small, so the validation
accuracy of the live model jitters from one checkpoint to the next, as downstream scores do during LLM
pretraining (arXiv 2510.04848).

One :class:`~checkpoint_stability.callbacks.lightning.StabilityCallback` is all it takes: every
``--every`` optimizer steps it snapshots the LightningModule into a rolling window of ``--window``
snapshots under ``<out>/stability`` and evaluates three models side by side:

* ``raw``: the live model, as Lightning's own validation loop sees it;
* ``avg``: the uniform average of the weights of the window's snapshots;
* ``ens``: the majority vote of the window's cached per-example predictions (no extra forward pass).

It is built with ``tasks=None``, so it evaluates a default
:class:`~checkpoint_stability.tasks.ClassificationTask` named ``validation``, built from the Trainer's
own validation dataloader (``(inputs, labels)`` batches). The scores go to the Trainer's
``TensorBoardLogger``, next to the training loss and Lightning's ``val/accuracy``, with a chart per task
holding raw, avg and ens together (the "Custom Scalars" tab). The best window average is exported.

The averaged model should move less between evaluations (lower MTV, mean total variation) and the
ensemble's per-example answers should flip less often (lower IS, instability score), both scoring at
least as well as the live model. The summary at the end is recomputed from the run directory alone.

Run it (about a minute on 2 CPU cores)::

    python examples/lightning_classifier.py [--steps 3000] [--every 25] [--window 5] \\
        [--out runs/lightning_classifier]
    tensorboard --logdir runs/lightning_classifier
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
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_stability.callbacks.lightning import StabilityCallback
from checkpoint_stability.reporting.summary import print_summary

SEED = 0
CLASSES = 3
TRAIN_EXAMPLES = 6000
VALIDATION_EXAMPLES = 1000  # under the default task's cap of 2048 examples, so it keeps them all
POSITION_NOISE = 0.08  # Gaussian jitter of the points: neighbouring arms overlap a little
LABEL_NOISE = 0.1  # share of labels replaced by a random class: no model gets near 100%
HIDDEN_WIDTH = 64
BATCH_SIZE = 16
# Plain SGD with momentum at a rate this high keeps the weights bouncing around the optimum instead of
# settling into it: exactly the checkpoint-to-checkpoint noise that averaging and ensembling remove.
LEARNING_RATE = 0.1
MOMENTUM = 0.9


# ------------------------------------------------------------------------------------------------- the data


def spiral_data(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points of a three-armed spiral, (features of shape (count, 2), labels of shape (count,)).

    No straight line separates the arms, so the classifier has to bend its boundaries, and with
    overlapping arms and some flipped labels its accuracy stays well below 1 and keeps moving.
    """
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    along = torch.rand(count, generator=generator)  # 0 at the centre, 1 at the end of an arm
    angle = 2 * math.pi * (along + labels / CLASSES)  # each arm winds once around the centre
    radius = 0.1 + along
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    points += POSITION_NOISE * torch.randn(count, 2, generator=generator)
    flipped = torch.rand(count, generator=generator) < LABEL_NOISE
    labels = torch.where(flipped, torch.randint(0, CLASSES, (count,), generator=generator), labels)
    return points, labels


# ------------------------------------------------------------------------------------------------ the model


class SpiralClassifier(LightningModule):
    def __init__(self, learning_rate: float = LEARNING_RATE):
        super().__init__()
        self.save_hyperparameters()  # shown in TensorBoard's HParams tab
        self.network = nn.Sequential(
            nn.Linear(2, HIDDEN_WIDTH),
            nn.ReLU(),
            nn.Linear(HIDDEN_WIDTH, HIDDEN_WIDTH),
            nn.ReLU(),
            nn.Linear(HIDDEN_WIDTH, CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (batch, classes): what the callback's ClassificationTask calls."""
        return self.network(features)

    def training_step(self, batch, batch_idx):
        features, labels = batch
        loss = F.cross_entropy(self(features), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        # Lightning's own view of the live model, once an epoch; the callback's "raw" series is the same
        # accuracy on the same examples, every --every steps.
        features, labels = batch
        accuracy = (self(features).argmax(dim=1) == labels).float().mean()
        self.log("val/accuracy", accuracy, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=MOMENTUM)


# --------------------------------------------------------------------------------------------- the summary


# ------------------------------------------------------------------------------------------------ training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--every", type=int, default=25, help="snapshot and evaluate every N steps (25)")
    parser.add_argument("--window", type=int, default=5, help="snapshots averaged and ensembled (5)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/lightning_classifier"), help="Trainer root directory"
    )
    parser.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delete the output directory first (default); with --no-fresh a rerun, which starts over from "
        "step 0 without a checkpoint, is refused with ExistingRunError: the callback never replaces "
        "another run's results unless told overwrite=True",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-snapshot lines")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    seed_everything(SEED, verbose=False)
    torch.set_num_threads(2)
    # A tiny in-memory dataset is fastest read in the main process; Lightning's hint to add workers
    # does not apply.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)

    # Two different generators: the validation set is not a resample of the training points.
    train_features, train_labels = spiral_data(TRAIN_EXAMPLES, torch.Generator().manual_seed(SEED))
    validation_features, validation_labels = spiral_data(
        VALIDATION_EXAMPLES, torch.Generator().manual_seed(SEED + 1)
    )
    train_loader = DataLoader(
        TensorDataset(train_features, train_labels),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    # Not shuffled: the default task reads this loader once, and every evaluation must see the same
    # examples in the same order for IS and the ensemble to compare answers example by example.
    validation_loader = DataLoader(TensorDataset(validation_features, validation_labels), batch_size=500)

    stability = StabilityCallback(
        tasks=None,  # the default: a ClassificationTask on the Trainer's validation data
        window=args.window,
        every_n_steps=args.every,
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
        log_every_n_steps=25,
        # The callback exports the best window average itself; Lightning's checkpoints would hold raw
        # weights of single steps.
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = SpiralClassifier()
    started = time.time()
    trainer.fit(model, train_loader, validation_loader)
    elapsed = time.time() - started

    # The task the callback built at the start of fit from validation_loader.
    default_task = stability.monitor.tasks[0]
    print(f"\ndone: {args.steps} steps in {elapsed:.0f}s; the default task: {default_task!r}")
    run_dir = stability.monitor.dirpath
    # The paper's comparison over the final 20% of evaluations, recomputed from the run directory alone.
    print_summary(run_dir)

    best = stability.best
    if best is not None:
        # The export is a window average, which none of Lightning's checkpoints holds; load_best puts it
        # into a fresh module of the same class.
        averaged = SpiralClassifier()
        stability.load_best(averaged)
        averaged.eval()
        with torch.no_grad():
            accuracy = (averaged(validation_features).argmax(dim=1) == validation_labels).float().mean()
        print(
            f"\nbest model (select='avg'): step {best['step']}, the average of steps {best['steps'][0]}-"
            f"{best['steps'][-1]}, validation accuracy {best['score']:.3f} (reloaded: {accuracy:.3f}), "
            f"exported to {stability.best_model_path / 'model.safetensors'}"
        )
    print(f"\nTensorBoard (train/loss, val/accuracy, stability/*): tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
