"""What the FSDP1 and ZeRO-3 tests share: reading the per-rank results their torchrun scripts write,
float64 oracles of the gathered states, and the background evaluator's check of a sharded run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoint_stability import BackgroundEvaluator, FunctionTask
from checkpoint_stability.followed_buffer import FollowedBuffer


def ranks_of(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def as64(state: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()}


def mean64(states: list[dict]) -> dict[str, torch.Tensor]:
    """The float64 uniform average of gathered states (integer buffers: the newest, as averaged states
    take them)."""
    out = {}
    for key in states[0]:
        values = [torch.tensor(s[key], dtype=torch.float64) for s in states]
        floating = isinstance(states[0][key], (list, float))
        out[key] = sum(values) / len(values) if floating else values[-1]
    return out


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def assert_a_background_evaluator_puts_the_run_together(run_root: Path, hidden: int) -> None:
    """The script's background run (``<run_root>/bg``, 2 ranks, steps 1-3): one process puts every
    step's shards together exactly as the ranks gathered them, evaluates it with an MLP of ``hidden``
    units, and exports what an inline run would (the gathered float64 average, or the raw step)."""
    data = ranks_of(run_root)[0]
    states = [as64(state) for state in data["background"]["states"]]
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"])
    run = run_root / "bg"
    shards = [run / "buffer" / f"rank-{r}" for r in (0, 1)]
    followed = FollowedBuffer(shards[0], 2, shards=shards)
    entries, _ = followed.unconsumed(None)
    assert [e.step for e in entries] == [1, 2, 3]
    for entry, state in zip(entries, states, strict=True):
        full = followed.load(entry)
        assert sorted(full) == sorted(state)
        assert all(torch.equal(full[k].double(), state[k]) for k in state)

    model = torch.nn.Sequential(
        torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 3)
    )
    task = FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())
    result = BackgroundEvaluator(run, [task], model, console=False).run(timeout=0)
    assert result.evaluated == [1, 2, 3] and result.closed
    best = json.loads((run / "best.json").read_text())
    exported = read_file(run / best["path"] / "model.safetensors")
    want = mean64([data["background"]["states"][s - 1] for s in best["steps"]])
    if best["variant"] == "raw":
        want = states[best["step"] - 1]
    for key, value in exported.items():
        torch.testing.assert_close(value.double(), want[key].double(), rtol=0, atol=1e-6)
