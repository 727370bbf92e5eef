"""StabilityCallback under Lightning's ModelParallelStrategy with FSDP2 shards, on two CPU processes.

Lightning's launcher re-executes sys.argv for rank 1, so the run is a standalone script
(tests/distributed/lightning_fsdp2.py) in a subprocess; the subprocess timeout is the proof that no
rank is left waiting in a collective. The oracle is the float64 average of the full weights gathered
at the snapshot steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SCRIPTS = Path(__file__).parent / "distributed"
WINDOW, EVERY, MAX_STEPS = 3, 2, 10  # as in the script
STEPS = list(range(EVERY, MAX_STEPS + 1, EVERY))


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    command = [sys.executable, str(SCRIPTS / "lightning_fsdp2.py"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        pytest.fail(
            f"the FSDP2 script failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return out


def window_average(states: dict[str, dict], steps: list[int]) -> dict[str, torch.Tensor]:
    """The float64 uniform average of the gathered full weights at ``steps``."""
    keys = states[str(steps[0])]
    return {
        key: sum(torch.tensor(states[str(s)][key], dtype=torch.float64) for s in steps) / len(steps)
        for key in keys
    }


def window_at(step: int) -> list[int]:
    return [s for s in STEPS if s <= step][-WINDOW:]


def accuracy(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """The MLP of the script (Linear, Tanh, Linear) in plain torch, float32."""
    w = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in weights.items()}
    hidden = torch.tanh(x @ w["net.0.weight"].T + w["net.0.bias"])
    logits = hidden @ w["net.2.weight"].T + w["net.2.bias"]
    return (logits.argmax(-1) == y).double().mean().item()


def test_fsdp2_shards_are_buffered_and_averaged_locally_under_lightning(fsdp2_run):
    ranks = [json.loads((fsdp2_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    run = fsdp2_run / "run"
    for data in ranks:
        assert data["global_step"] == MAX_STEPS and data["world_size"] == 2
        assert sorted(data["before"], key=int) == [str(s) for s in STEPS]
        # After the stability callback the live shards are back bit for bit.
        assert data["after"] == data["before"]
    states = ranks[0]["before"]
    assert ranks[1]["before"] == states  # the gathered weights are one model
    assert ranks[0]["records"] == ranks[1]["records"]
    # The model trains, so averaging is not trivially the newest snapshot.
    assert states[str(STEPS[-1])] != states[str(STEPS[-2])]

    oracle = window_average(states, window_at(MAX_STEPS))
    newest = {k: torch.tensor(v, dtype=torch.float64) for k, v in states[str(MAX_STEPS)].items()}
    assert max((oracle[k] - newest[k]).abs().max().item() for k in oracle) > 1e-3
    for rank, data in enumerate(ranks):
        # FSDP2 shards dim 0 like torch.chunk: Linear(10, 3)'s rows split unevenly, 2 and 1.
        assert data["shapes"]["net.2.weight"] == [2 - rank, 10]
        assert data["average_count"] == WINDOW
        assert set(data["local_average"]) == set(oracle)
        for key, value in data["local_average"].items():
            expected = torch.chunk(oracle[key], 2, dim=0)[rank]
            assert list(expected.shape) == data["shapes"][key]
            torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), expected, rtol=0, atol=1e-6)

        # Each rank's buffer holds exactly the window, as its own local shards.
        names = [f"step-{s:08d}.safetensors" for s in window_at(MAX_STEPS)]
        files = sorted((run / "buffer" / f"rank-{rank}").glob("*.safetensors"))
        assert [f.name for f in files] == names
        assert [n for n in data["buffer_files"] if n.endswith(".safetensors")] == names
        for step, path in zip(window_at(MAX_STEPS), files, strict=True):
            with safe_open(str(path), framework="pt") as handle:
                assert set(handle.keys()) == set(oracle)
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    assert list(tensor.shape) == data["shapes"][key]
                    full = torch.tensor(states[str(step)][key], dtype=torch.float32)
                    assert torch.equal(tensor, torch.chunk(full, 2, dim=0)[rank])

        # The evaluations saw the whole model on every rank: raw, then the window average, per snapshot.
        raws, avgs = data["seen"][0::2], data["seen"][1::2]
        assert len(raws) == len(avgs) == len(STEPS)
        for step, raw, averaged in zip(STEPS, raws, avgs, strict=True):
            assert raw == states[str(step)]
            expected = window_average(states, window_at(step))
            for key, value in averaged.items():
                torch.testing.assert_close(
                    torch.tensor(value, dtype=torch.float64), expected[key], rtol=0, atol=1e-6
                )

    assert json.loads((run / "run.json").read_text()) == {"world_size": 2, "sharded": True}

    # One history (rank 0's): raw, avg and ens at every snapshot step, scored on the whole batch.
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert not [h for h in history if "error" in h]
    got = {(h["step"], h["variant"]): h for h in history if h["task"] == "cls"}
    assert sorted(got) == sorted((s, v) for s in STEPS for v in ("raw", "avg", "ens"))
    x, y = torch.tensor(ranks[0]["x_eval"]), torch.tensor(ranks[0]["y_eval"])
    for step in STEPS:
        assert got[(step, "raw")]["score"] == pytest.approx(accuracy(states[str(step)], x, y), abs=1e-12)
        assert got[(step, "avg")]["n_models"] == len(window_at(step))
        assert got[(step, "ens")]["n_models"] == len(window_at(step))
    returned = {
        (r["step"], r["variant"]): r["score"]
        for step_records in ranks[0]["records"].values()
        for r in step_records
        if r["task"] == "cls"
    }
    assert returned == {key: record["score"] for key, record in got.items()}

    # A best avg export gathered the full averaged model to rank 0: the float64 window average.
    best_file = run / "best.json"
    if best_file.exists():
        best = json.loads(best_file.read_text())
        if best["variant"] == "avg":
            assert best["steps"] == window_at(best["step"])
            expected = window_average(states, best["steps"])
            with safe_open(str(run / best["path"] / "model.safetensors"), framework="pt") as handle:
                assert set(handle.keys()) == set(expected)
                for key in handle.keys():
                    assert list(handle.get_tensor(key).shape) == list(expected[key].shape)
                    torch.testing.assert_close(
                        handle.get_tensor(key).double(), expected[key], rtol=0, atol=1e-6
                    )
