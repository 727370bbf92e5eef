"""Run by tests/test_lightning_fsdp2.py as a standalone script: StabilityCallback under Lightning's
ModelParallelStrategy with FSDP2 (``fully_shard``) on two CPU processes (gloo).

``python lightning_fsdp2.py OUT`` trains a small MLP whose Linear layers and root are sharded over the
data-parallel mesh; Lightning's launcher re-executes this script for rank 1. Each rank writes
``OUT/rank<R>.json``: the gathered full weights at every snapshot step (before and after the stability
callback), the full weights its raw / avg evaluations saw, the evaluation batch, its own averaged local
shards, their shapes, the records it got back and its buffer's file names. The run directory is
``OUT/run``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_stability import FunctionTask
from checkpoint_stability.callbacks.lightning import StabilityCallback

WINDOW = 3
EVERY = 2
MAX_STEPS = 10


def full_state(module: torch.nn.Module) -> dict[str, list]:
    """Every state-dict entry gathered to its full value (collective: every rank calls it)."""
    return {k: v.full_tensor().tolist() for k, v in module.state_dict().items()}


class ShardedMLP(LightningModule):
    def __init__(self):
        super().__init__()
        # Linear(10, 3): 3 rows over 2 ranks, so the shards are uneven (2 and 1 rows).
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]  # (data_parallel=2, tensor_parallel=1)
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


class Recorder(Callback):
    """At the stability callback's snapshot steps: the gathered full weights, and each rank's shard shapes."""

    def __init__(self):
        self.states: dict[str, dict] = {}
        self.shapes: dict[str, list] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % EVERY or str(step) in self.states:
            return
        self.states[str(step)] = full_state(pl_module)
        self.shapes = {k: list(v.to_local().shape) for k, v in pl_module.state_dict().items()}


class Records(Callback):
    """After the stability callback: what it returned at each snapshot step."""

    def __init__(self, stability: StabilityCallback):
        self.stability = stability
        self.records: dict[str, list] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % EVERY or str(step) in self.records:
            return
        self.records[str(step)] = self.stability.latest_records


def main(out: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)  # the same initial weights and data on every rank
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    x_eval, y_eval = torch.randn(16, 6), torch.randint(0, 3, (16,))
    seen: list[dict] = []

    def predict(model):
        outputs = model(x_eval).argmax(-1).tolist()  # FSDP2 forward: a collective on every rank
        seen.append(full_state(model))
        return outputs

    task = FunctionTask("cls", predict, targets=y_eval.tolist())
    stability = StabilityCallback(
        [task], window=WINDOW, every_n_steps=EVERY, dirpath=f"{out}/run", console=False
    )
    # Before the stability callback (the weights it snapshots) and after it (they must come back).
    before, after, records = Recorder(), Recorder(), Records(stability)
    trainer = Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        accelerator="cpu",
        devices=2,
        max_steps=MAX_STEPS,
        callbacks=[before, stability, after, records],
        logger=False,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedMLP(), DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    rank = trainer.global_rank
    buffer = Path(out) / "run" / "buffer" / f"rank-{rank}"
    result = {
        "global_step": trainer.global_step,
        "x_eval": x_eval.tolist(),
        "y_eval": y_eval.tolist(),
        "world_size": trainer.world_size,
        "before": before.states,
        "after": after.states,
        "shapes": before.shapes,
        "seen": seen,
        "records": records.records,
        "local_average": {k: v.tolist() for k, v in stability.monitor.average.mean().items()},
        "average_count": stability.monitor.average.count,
        "buffer_files": sorted(p.name for p in buffer.iterdir()),
    }
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
