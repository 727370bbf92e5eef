"""Run by tests/test_lightning_callback.py in a subprocess: a Lightning fit with the callback that
kills itself with SIGKILL right after the snapshot of step 10 (checkpoints every 4 steps), so that
snapshot's file write may still be in flight, as in a real pre-emption. ``lightning_killed.py ROOT``."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from test_lightning_callback import fit
from tiny_training import classify_task, make_data

from checkpoint_stability.callbacks.lightning import StabilityCallback


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    x, y = make_data(1)
    stability = StabilityCallback([classify_task(x, y)], window=3, every_n_steps=2, console=False)
    checkpoints = ModelCheckpoint(root / "ckpts", every_n_train_steps=4, save_top_k=-1)
    fit(root / "first", [stability, KillAt(10), checkpoints], max_steps=16)
