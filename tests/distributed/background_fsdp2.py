"""Run by tests/test_background.py under torchrun with two CPU processes (gloo): an FSDP2 model trained
with evaluation="background", so each rank only buffers its own shards under buffer/rank-R/.

Rank 0 writes states.json: the full (gathered) weights after every snapshot step.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint_stability import StabilityMonitor


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor = StabilityMonitor(
        [],
        dirpath=f"{out}/run",
        window=3,
        every_n_steps=1,
        console=False,
        evaluation="background",
        max_pending=20,
    )
    monitor.open(model=model)
    states = []
    for step in range(1, 6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append({k: v.full_tensor().tolist() for k, v in model.state_dict().items()})
        monitor.on_snapshot(model, step)
    monitor.close()
    if dist.get_rank() == 0:
        with open(f"{out}/states.json", "w") as handle:
            json.dump({"states": states, "x": x.tolist(), "y": y.tolist()}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
