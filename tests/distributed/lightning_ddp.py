"""Run by tests/test_lightning_callback.py as a standalone script: StabilityCallback under Lightning DDP.

``python lightning_ddp.py OUT`` trains on two CPU processes (gloo) twice, with one task that raises on
rank 1 only: first with ``on_error="warn"`` (skipped on both ranks, training goes on), then with
``on_error="raise"`` (every rank stops). Lightning's launcher re-executes this script for rank 1 once;
the second Trainer reuses the processes and the process group. Each rank writes what it saw to
``OUT/<mode>/rank<R>.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_stability import ClassificationTask, FunctionTask
from checkpoint_stability.callbacks.lightning import StabilityCallback


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Probe(Callback):
    """After the stability callback: what every rank got back, and an accuracy oracle of the raw model."""

    def __init__(self, stability: StabilityCallback, x: torch.Tensor, y: torch.Tensor):
        self.stability, self.x, self.y = stability, x, y
        self.records: dict[str, list] = {}
        self.raw_oracle: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % 2 or str(step) in self.records:
            return
        self.records[str(step)] = self.stability.latest_records
        with torch.no_grad():
            self.raw_oracle[str(step)] = (pl_module(self.x).argmax(-1) == self.y).double().mean().item()


def run(out: str, mode: str) -> None:
    seed_everything(0, verbose=False)
    x, y = torch.randn(37, 4), torch.randint(0, 3, (37,))  # odd: the ranks' shares are padded

    rank_holder = {}

    def flaky(model):
        if rank_holder["rank"] == 1:
            raise RuntimeError("rank 1 broke")
        return [0] * 5

    tasks = [
        ClassificationTask("cls", (x, y), batch_size=8, show_progress=False),
        FunctionTask("flaky", flaky, targets=[0] * 5),
    ]
    stability = StabilityCallback(
        tasks, window=2, every_n_steps=2, dirpath=f"{out}/run", on_error=mode, console=False
    )
    probe = Probe(stability, x, y)
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        callbacks=[stability, probe],
        logger=CSVLogger(out, name="csv"),
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    rank_holder["rank"] = trainer.global_rank
    train = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    result: dict = {}
    try:
        trainer.fit(Net(), train)
    except Exception as error:
        result["error"] = repr(error)
    digest = hashlib.sha256()
    for tensor in trainer.lightning_module.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    result.update(
        records=probe.records,
        raw_oracle=probe.raw_oracle,
        global_step=trainer.global_step,
        weights=digest.hexdigest(),
    )
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)


def main(out: str) -> None:
    torch.set_num_threads(1)
    for mode in ("warn", "raise"):
        run(f"{out}/{mode}", mode)


if __name__ == "__main__":
    main(sys.argv[1])
