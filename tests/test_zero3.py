"""DeepSpeed ZeRO-3 on two CPU processes (gloo, ``DS_ACCELERATOR=cpu``): each rank snapshots its own
partitions without gathering, averages them locally, the avg evaluation computes with the averaged
weights, the live ones come back bit for bit, and the model is gathered once per export.

The run is tests/distributed/monitor_zero3.py under torchrun (one launch for the whole module, about 25
s). Oracles are DeepSpeed's own and hand-made: full weights gathered by ``deepspeed.zero.
GatheredParameters``, each rank's partition as ``param.ds_tensor`` holds it, the partition rebuilt by
hand (the flattened parameter padded to an even length, rank ``r`` taking the ``r``-th half), files read
with ``safetensors.safe_open``, float64 averages.

Lightning's ``DeepSpeedStrategy`` needs a CUDA GPU, so the callbacks are driven hook by hook with the
modules each framework hands them under DeepSpeed; see the script's docstring. Skipped where DeepSpeed
is not installed (``make test-min``'s venv).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from sharded_runs import (
    as64,
    assert_a_background_evaluator_puts_the_run_together,
    mean64,
    ranks_of,
    read_file,
)
from test_distributed import torchrun

from checkpoint_stability import StabilityMonitor

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (the deepspeed extra)"
)

WINDOW = 3
SHAPES = {
    "0.weight": [7, 6],
    "0.bias": [7],
    "2.weight": [7],
    "2.bias": [7],
    "3.weight": [3, 7],
    "3.bias": [3],
}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    torchrun("monitor_zero3.py", out)
    return out


def partition(full: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s valid elements of a parameter, made by hand as deepspeed partitions it: flattened,
    padded to a multiple of the world size (2), the ``rank``-th of two equal pieces, padding cut off."""
    flat = full.reshape(-1)
    size = math.ceil(flat.numel() / 2)
    return flat[rank * size : (rank + 1) * size]


def test_each_rank_buffers_its_partitions_as_deepspeed_holds_them(zero3_run):
    for rank, data in enumerate(ranks_of(zero3_run)):
        inline, resumed = data["inline"], data["inline"]["resumed"]
        # The trajectory on disk: step 3 from the first monitor, steps 4 and 5 from the resumed one.
        taken = {3: inline["steps"][2], 4: resumed["steps"][0], 5: resumed["steps"][1]}
        files = sorted((zero3_run / "run" / "buffer" / f"rank-{rank}").glob("*.safetensors"))
        assert [f.name for f in files] == [f"step-{s:08d}.safetensors" for s in (3, 4, 5)]
        for step, path in zip((3, 4, 5), files, strict=True):
            stored = read_file(path)
            full = as64(taken[step]["state"])
            for name, shape in SHAPES.items():
                # Partition-shaped: 1-D, this rank's elements only, never the full parameter.
                want = partition(full[name], rank)
                assert list(stored[name].shape) == [want.numel()] and want.numel() < math.prod(shape)
                assert torch.equal(stored[name].double(), want)
                # And exactly what DeepSpeed's ds_tensor holds, the padding left out.
                held = torch.tensor(taken[step]["local"][name])
                assert torch.equal(stored[name], held[: want.numel()])
            # BatchNorm's buffers are never partitioned: whole on every rank.
            assert list(stored["2.running_mean"].shape) == [7]
            assert stored["2.num_batches_tracked"].item() == full["2.num_batches_tracked"].item()
        # 3.weight has 21 elements: 11 on rank 0, 10 (and one of padding in ds_tensor) on rank 1.
        assert len(inline["steps"][0]["local"]["3.weight"]) == 11
        assert read_file(files[0])["3.weight"].numel() == (11 if rank == 0 else 10)


def test_averaged_partitions_are_the_float64_average_of_the_gathered_snapshots(zero3_run):
    ranks = ranks_of(zero3_run)
    states = [step["state"] for step in ranks[0]["inline"]["steps"]]
    assert states == [step["state"] for step in ranks[1]["inline"]["steps"]]  # one model
    assert states[-1] != states[-2]  # it trains: an average is not the newest snapshot
    oracle = mean64(states[-WINDOW:])
    for rank, data in enumerate(ranks):
        average = as64(data["inline"]["average"])
        for name in SHAPES:
            torch.testing.assert_close(average[name], partition(oracle[name], rank), rtol=0, atol=1e-6)
        torch.testing.assert_close(average["2.running_var"], oracle["2.running_var"], rtol=0, atol=1e-6)


def test_the_avg_evaluation_computes_with_the_averaged_weights_and_training_gets_its_own_back(zero3_run):
    ranks = ranks_of(zero3_run)
    states = [step["state"] for step in ranks[0]["inline"]["steps"]]
    for data in ranks:
        seen = data["inline"]["seen"][:10]  # (raw, avg) per step; then the resumed monitor's
        for index in range(5):
            raw, averaged = seen[2 * index], seen[2 * index + 1]
            # What ZeRO-3 gathered for the forward pass: every parameter, whole.
            assert {k: list(torch.tensor(v).shape) for k, v in averaged.items()} == SHAPES
            window = mean64(states[max(0, index + 1 - WINDOW) : index + 1])
            for name, value in averaged.items():
                torch.testing.assert_close(torch.tensor(value).double(), window[name], rtol=0, atol=1e-6)
            for name, value in raw.items():
                assert torch.equal(torch.tensor(value).double(), as64(states[index])[name])
        for step in data["inline"]["steps"]:
            # Bit for bit: the partitions (padding included) and the gathered weights.
            assert step["restored_local"] and step["restored"]
            # The next forward pass computes with the live weights, not a copy left gathered by the
            # avg evaluation (float32 against a float64 forward of the gathered weights).
            assert step["after"] < 1e-5


def test_no_gather_per_snapshot_only_one_per_export(zero3_run):
    ranks = ranks_of(zero3_run)
    partitioned = ranks[0]["inline"]["partitioned"]
    assert partitioned == len(SHAPES)
    for data in ranks:
        # The counters see ZeRO-3's gathers: a forward pass all-gathers, through DeepSpeed and torch.
        probe = data["inline"]["probe"]
        assert probe.get("deepspeed.all_gather_into_tensor", 0) > 0
        assert probe.get("torch.all_gather_into_tensor", 0) > 0
    exported = [step["exported"] for step in ranks[0]["inline"]["steps"]]  # best.json is rank 0's
    assert any(exported) and not all(exported)
    for data in ranks:
        for step, was_exported in zip(data["inline"]["steps"], exported, strict=True):
            # Outside the tasks' own forward passes: no collective of DeepSpeed's at all at a snapshot;
            # one all-gather per parameter (the model gathered once) when a new best is exported.
            if was_exported:
                assert step["collectives"] == {
                    "deepspeed.all_gather_into_tensor": partitioned,
                    "torch.all_gather_into_tensor": partitioned,
                }
            else:
                assert step["collectives"] == {}


def test_the_export_is_the_gathered_float64_average(zero3_run):
    inline = ranks_of(zero3_run)[0]["inline"]
    # The trajectory after the resume from step 3: steps 1-3, then the resumed 4 and 5.
    states = {i + 1: step["state"] for i, step in enumerate(inline["steps"][:3])}
    states.update({4 + i: step["state"] for i, step in enumerate(inline["resumed"]["steps"])})
    run = zero3_run / "run"
    best = json.loads((run / "best.json").read_text())
    exported = read_file(run / best["path"] / "model.safetensors")
    want = (
        mean64([states[s] for s in best["steps"]]) if best["variant"] == "avg" else as64(states[best["step"]])
    )
    assert set(exported) == set(states[1])  # the engine's module's names, whole tensors
    for key, value in exported.items():
        assert list(value.shape) == list(want[key].shape)
        torch.testing.assert_close(value.double(), want[key].double(), rtol=0, atol=1e-6)
    assert json.loads((run / "run.json").read_text()) == {"world_size": 2, "sharded": True}


def test_resume_with_the_same_world_size_continues_the_window(zero3_run):
    for rank, data in enumerate(ranks_of(zero3_run)):
        inline = data["inline"]
        window = [inline["steps"][2]["state"], *(s["state"] for s in inline["resumed"]["steps"])]
        oracle = mean64(window)
        average = as64(inline["resumed"]["average"])
        for name in SHAPES:
            torch.testing.assert_close(average[name], partition(oracle[name], rank), rtol=0, atol=1e-6)
    history = [json.loads(line) for line in (zero3_run / "run" / "history.jsonl").read_text().splitlines()]
    scores = [(h["step"], h["task"], h["variant"], h["window"]) for h in history if "error" not in h]
    assert len(scores) == len(set(scores))  # the abandoned steps 4 and 5 were dropped, not duplicated
    assert {s[0] for s in scores} == {1, 2, 3, 4, 5}


def test_another_world_size_is_refused(zero3_run):
    monitor = StabilityMonitor([], dirpath=zero3_run / "run", console=False)
    with pytest.raises(ValueError, match="2 ranks"):
        monitor.open(resume_step=5)


def test_a_background_evaluator_puts_zero3_partitions_together(zero3_run):
    """Each rank's manifest records how its partitions make up the parameters; one process puts them
    together and evaluates, exporting what an inline run would."""
    assert_a_background_evaluator_puts_the_run_together(zero3_run, hidden=7)


def accuracy(weights: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """The adapters' MLP (Linear, Tanh, Linear) in plain torch."""
    hidden = torch.tanh(x.double() @ weights[f"{prefix}0.weight"].T + weights[f"{prefix}0.bias"])
    logits = hidden @ weights[f"{prefix}2.weight"].T + weights[f"{prefix}2.bias"]
    return (logits.argmax(-1) == y).double().mean().item()


@pytest.mark.parametrize(("name", "prefix"), [("lightning_zero3", "net."), ("transformers_zero3", "")])
def test_callbacks_snapshot_zero3_models_partition_by_partition(zero3_run, name, prefix):
    """Each callback handed the module its framework hands it under DeepSpeed: rank-local partition
    files, the avg score of the float64 window average, records equal on both ranks."""
    ranks = ranks_of(zero3_run)
    x, y = torch.tensor(ranks[0]["x"]), torch.tensor(ranks[0]["y"])
    results = [data["adapters"][name] for data in ranks]
    assert results[0]["records"] == results[1]["records"]
    states = results[0]["states"]
    run = zero3_run / name
    assert json.loads((run / "run.json").read_text()) == {"world_size": 2, "sharded": True}
    for rank in (0, 1):
        files = sorted((run / "buffer" / f"rank-{rank}").glob("*.safetensors"))
        assert [f.name for f in files] == ["step-00000002.safetensors", "step-00000003.safetensors"]
        stored = read_file(files[-1])
        full = as64(states[-1])
        assert set(stored) == set(full)
        for key, value in stored.items():
            assert torch.equal(value.double(), partition(full[key], rank))
    records = {(r["task"], r["variant"]): r for r in results[0]["records"]}
    assert records[("cls", "avg")]["n_models"] == 2
    assert records[("cls", "avg")]["score"] == pytest.approx(
        accuracy(mean64(states[-2:]), prefix, x, y), abs=1e-12
    )
    assert records[("cls", "raw")]["score"] == pytest.approx(
        accuracy(as64(states[-1]), prefix, x, y), abs=1e-12
    )


def test_zero_plus_plus_hierarchical_partitioning_is_refused_naming_what_to_change(zero3_run):
    for data in ranks_of(zero3_run):
        error = data["refusals"]["hpz"]
        assert error is not None and error.startswith("PartitionedModelError")
        assert "hpZ" in error and "zero_hpz_partition_size" in error and "FSDP2" in error
