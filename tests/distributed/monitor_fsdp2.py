"""Run by tests/test_distributed.py under torchrun with two CPU processes (gloo): an FSDP2 model.

Each rank writes rank<R>.json: the full (gathered) weights after every step, its own averaged local
shards, what the avg evaluations saw, and the records it got back.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint_stability import FunctionTask, StabilityMonitor


def full_state(model: torch.nn.Module) -> dict:
    """Every parameter gathered (collective), as lists."""
    return {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    seen: list[dict] = []

    def predict(m):
        outputs = m(x).argmax(-1).tolist()  # a collective forward on every rank
        seen.append(full_state(m))
        return outputs

    task = FunctionTask("cls", predict, targets=y.tolist())
    monitor = StabilityMonitor([task], dirpath=f"{out}/run", window=3, every_n_steps=1, console=False)
    monitor.open(model=model)
    states, records, shapes = [], [], {}
    for step in range(1, 6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append(full_state(model))
        records.append(monitor.on_snapshot(model, step))
        after = full_state(model)
        assert after == states[-1], "the live shards must come back bit for bit"
    local_average = {k: v.tolist() for k, v in monitor.average.mean().items()}
    shapes = {k: list(v.to_local().shape) for k, v in model.state_dict().items()}
    monitor.close()
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(
            {
                "states": states,
                "local_average": local_average,
                "shapes": shapes,
                "seen": seen,
                "records": records,
            },
            handle,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
