"""The monitor in two CPU processes (gloo), launched by torchrun as a standalone script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "distributed"


def torchrun(script: str, out: Path, nproc: int = 2) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(SCRIPTS / script),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def test_two_ranks_agree_rank_zero_writes_and_averages_are_broadcast(tmp_path):
    torchrun("monitor_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Every rank returns the same records, and the live weights come back bit-exactly on both.
    assert ranks[0]["records"] == ranks[1]["records"]
    assert all(ranks[0]["restored"]) and all(ranks[1]["restored"])
    # Rank 1's avg evaluations saw rank 0's window average (float64 oracle over the raw states).
    for seen in (ranks[0]["seen"], ranks[1]["seen"]):
        raws, avgs = seen[0::2], seen[1::2]
        assert len(raws) == len(avgs) == 4
        for index, averaged in enumerate(avgs):
            window = raws[max(0, index - 1) : index + 1]
            for key, value in averaged.items():
                oracle = sum(torch.tensor(w[key], dtype=torch.float64) for w in window) / len(window)
                torch.testing.assert_close(
                    torch.tensor(value, dtype=torch.float64), oracle, rtol=0, atol=1e-6
                )
    # Only rank 0 wrote: one history, one buffer; the flaky task was skipped on both ranks together.
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    scores = [h for h in history if "error" not in h]
    assert {h["task"] for h in scores} == {"cls"}
    errors = [h for h in history if "error" in h]
    assert len(errors) == 8 and all(e["task"] == "flaky" for e in errors)
    assert all("another rank" in e["error"] for e in errors)
    assert sorted(p.name for p in (run / "buffer").glob("*.safetensors")) == [
        "step-00000003.safetensors",
        "step-00000004.safetensors",
    ]


def test_multiple_choice_split_across_two_ranks_equals_one_process(tmp_path):
    torchrun("multiple_choice_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["together"]["outputs"] == rank["alone"]["outputs"]
        for got, want in zip(
            rank["together"]["choice_logprobs"], rank["alone"]["choice_logprobs"], strict=True
        ):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    # Ragged shares (rank 0 has far more choices) still run the same number of forward passes.
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
    assert ranks[0]["together"] == ranks[1]["together"]


def test_fsdp2_shards_are_buffered_and_averaged_locally(tmp_path):
    from safetensors import safe_open

    torchrun("monitor_fsdp2.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["records"] == ranks[1]["records"]
    states = ranks[0]["states"]
    assert states == ranks[1]["states"]
    oracle = {
        key: sum(torch.tensor(s[key], dtype=torch.float64) for s in states[-3:]) / 3 for key in states[0]
    }
    for rank, data in enumerate(ranks):
        # Each rank's averaged shard is its slice (FSDP2 shards dim 0 like torch.chunk) of the float64
        # average of the gathered snapshots: averaged locally, never gathered.
        for key, value in data["local_average"].items():
            expected = torch.chunk(oracle[key], 2, dim=0)[rank]
            assert list(expected.shape) == data["shapes"][key]
            torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), expected, rtol=0, atol=1e-6)
        files = sorted((tmp_path / "run" / "buffer" / f"rank-{rank}").glob("*.safetensors"))
        assert [f.name for f in files] == [f"step-{s:08d}.safetensors" for s in (3, 4, 5)]
        with safe_open(str(files[-1]), framework="pt") as handle:
            for key in handle.keys():
                full = torch.tensor(states[-1][key])
                assert torch.equal(handle.get_tensor(key), torch.chunk(full, 2, dim=0)[rank])
    # The avg evaluations saw the whole averaged model on every rank (seen alternates raw, avg).
    for data in ranks:
        averaged = data["seen"][1::2][-1]
        for key, value in averaged.items():
            torch.testing.assert_close(
                torch.tensor(value, dtype=torch.float64), oracle[key], rtol=0, atol=1e-6
            )

    # The weight drift of the whole model, added up from the ranks' shard sums, equals a float64
    # recomputation from the gathered weights.
    def flat(state):
        return torch.cat([torch.tensor(state[key], dtype=torch.float64).reshape(-1) for key in sorted(state)])

    drift = [json.loads(line) for line in (tmp_path / "run" / "drift.jsonl").read_text().splitlines()]
    assert [line["step"] for line in drift] == [1, 2, 3, 4, 5]
    for index, line in enumerate(drift):
        now = flat(states[index])
        window = [flat(s) for s in states[max(0, index - 2) : index + 1]]
        average = (now - sum(window) / len(window)).norm() / now.norm()
        assert line["average"] == pytest.approx(float(average), rel=1e-5, abs=1e-9)
        assert line["n_models"] == len(window)
        if index == 0:
            assert line["previous"] is None and line["previous_step"] is None
        else:
            previous = (now - flat(states[index - 1])).norm() / now.norm()
            assert line["previous_step"] == index and line["previous"] == pytest.approx(
                float(previous), rel=1e-5
            )
    # A best export gathers the full averaged model once, to rank 0.
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["variant"] == "avg"
    window = [s for s in states[max(0, best["step"] - 3) : best["step"]]]
    with safe_open(str(tmp_path / "run" / best["path"] / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            expected = sum(torch.tensor(s[key], dtype=torch.float64) for s in window) / len(window)
            torch.testing.assert_close(handle.get_tensor(key).double(), expected, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"world_size": 2, "sharded": True}


def test_a_failure_to_open_on_one_rank_raises_the_same_error_everywhere(tmp_path):
    torchrun("monitor_open_failure.py", tmp_path)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["raised"] in ("FileExistsError", "NotADirectoryError")
    assert "rank-1" in outcomes[0]["message"]
