"""Run by tests/test_distributed.py under torchrun: opening fails on rank 1 only (its shard buffer
directory is blocked by a file); every rank must raise the same exception, and none may hang."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint_stability import StabilityMonitor


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Linear(4, 4)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    run = Path(out) / "run"
    if rank == 1:
        (run / "buffer").mkdir(parents=True, exist_ok=True)
        (run / "buffer" / "rank-1").write_text("a file where a directory belongs")
    dist.barrier()
    monitor = StabilityMonitor([], dirpath=run, every_n_steps=1, console=False)
    try:
        monitor.open(model=model)
        outcome = {"raised": None}
    except Exception as error:  # the point: what each rank raises
        outcome = {"raised": type(error).__name__, "message": str(error)}
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(outcome, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
