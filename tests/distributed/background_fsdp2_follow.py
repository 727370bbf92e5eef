"""Run by tests/test_background.py under torchrun with two CPU processes (gloo): the same FSDP2 training
evaluated inline (run A) and in the background (run B, the trainer only snapshots), then an evaluator
under the same two ranks follows B, each rank reading its own shards. The test compares A and B."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.evaluator import BackgroundEvaluator


def sharded_model(mesh) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (and in every phase)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(monitor: StabilityMonitor, mesh, x, y) -> None:
    model = sharded_model(mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor.open(model=model)
    for step in range(1, 9):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.on_snapshot(model, step)
    monitor.close()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())  # collective forward
    settings = dict(window=3, every_n_steps=1, console=False)
    train(StabilityMonitor([task], dirpath=f"{out}/inline", **settings), mesh, x, y)
    background = StabilityMonitor(
        [], dirpath=f"{out}/bg", evaluation="background", max_pending=20, **settings
    )
    train(background, mesh, x, y)
    result = BackgroundEvaluator(f"{out}/bg", [task], sharded_model(mesh), console=False).run(timeout=0)
    assert result.evaluated == list(range(1, 9)) and result.closed, result
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
