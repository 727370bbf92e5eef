"""Run by tests/test_distributed.py under torchrun with two CPU processes (gloo).

Every rank holds the full weights (as under DDP). Each rank writes what it saw to rank<R>.json.
"""

import json
import sys

import torch
import torch.distributed as dist

from checkpoint_stability import FunctionTask, StabilityMonitor


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    seen: list[dict] = []

    def predict(m):
        seen.append({k: v.tolist() for k, v in m.state_dict().items()})
        return m(x).argmax(-1).tolist()

    def flaky(m):
        if rank == 1:
            raise RuntimeError("rank 1 broke")
        return [0] * 4

    tasks = [FunctionTask("cls", predict, targets=y.tolist()), FunctionTask("flaky", flaky, targets=[0] * 4)]
    monitor = StabilityMonitor(tasks, dirpath=f"{out}/run", window=2, every_n_steps=1, console=False)
    records, restored = [], []
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.05 * step)  # deterministic, identical on every rank
        before = {k: v.clone() for k, v in model.state_dict().items()}
        records.append(monitor.on_snapshot(model, step))
        restored.append(all(torch.equal(before[k], v) for k, v in model.state_dict().items()))
    monitor.close()
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({"records": records, "restored": restored, "seen": seen}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
