"""FSDP1 (``FullyShardedDataParallel``) on two CPU processes (gloo): each rank snapshots its own flat
shards without gathering, averages them locally, and the model is gathered once per export.

The run is tests/distributed/monitor_fsdp1.py under torchrun (one launch for the whole module). Oracles
are torch's own: the full weights from ``get_model_state_dict``, each rank's shards from FSDP1's
``LOCAL_STATE_DICT``, files read with ``safetensors.safe_open``, and the flat layout rebuilt by hand
(parameters flattened in registration order, padded to an even length, cut in two by ``torch.chunk``).

Lightning's ``FSDPStrategy`` and the Hugging Face Trainer's ``fsdp`` refuse a CPU, so the callbacks are
driven hook by hook with the model where each framework keeps it; see the script's docstring.
"""

from __future__ import annotations

import json
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

WINDOW = 3
UNITS = {  # flat parameter -> the original parameters it holds, in FSDP1's order
    "_flat_param": ["2.weight", "2.bias"],  # the root unit: the BatchNorm's affine parameters (20)
    "0._flat_param": ["0.weight", "0.bias"],  # Linear(6, 10): 70 elements, 35 a rank
    "3._flat_param": ["3.weight", "3.bias"],  # Linear(10, 3): 33 elements, 17 a rank, one of padding
}


@pytest.fixture(scope="module")
def fsdp1_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp1")
    torchrun("monitor_fsdp1.py", out)
    return out


def flat_shard(full: dict[str, torch.Tensor], unit: str, rank: int) -> torch.Tensor:
    """A rank's shard of ``unit``'s flat parameter, made by hand from full tensors: FSDP1 flattens the
    unit's parameters in order, pads the vector to a multiple of the world size and chunks it."""
    flat = torch.cat([full[name].reshape(-1) for name in UNITS[unit]])
    flat = torch.nn.functional.pad(flat, [0, (-flat.numel()) % 2])
    return flat.chunk(2)[rank]


def test_each_rank_buffers_its_flat_shards_as_torch_holds_them(fsdp1_run):
    ranks = ranks_of(fsdp1_run)
    for rank, data in enumerate(ranks):
        inline, resumed = data["inline"], data["inline"]["resumed"]
        # The trajectory on disk: step 3 from the first monitor, steps 4 and 5 from the resumed one.
        locals_by_step = {
            3: inline["steps"][2]["local"],
            4: resumed["steps"][0]["local"],
            5: resumed["steps"][1]["local"],
        }
        directory = fsdp1_run / "run" / "buffer" / f"rank-{rank}"
        files = sorted(directory.glob("*.safetensors"))
        assert [f.name for f in files] == [f"step-{s:08d}.safetensors" for s in (3, 4, 5)]
        for step, path in zip((3, 4, 5), files, strict=True):
            stored = read_file(path)
            # Shard-shaped: one padded 1-D chunk per unit, never a full parameter.
            assert {k: list(stored[k].shape) for k in UNITS} == {
                "_flat_param": [10],
                "0._flat_param": [35],
                "3._flat_param": [17],
            }
            assert "0.weight" not in stored and "3.weight" not in stored
            for unit in UNITS:
                torch_shard = torch.tensor(locals_by_step[step][unit])  # LOCAL_STATE_DICT: without padding
                valid = torch_shard.numel()
                assert torch.equal(stored[unit][:valid], torch_shard)
                assert not stored[unit][valid:].any()  # the padding FSDP1 keeps at zero
            # Buffers are not sharded by FSDP1: whole on every rank.
            assert list(stored["2.running_mean"].shape) == [10]
    # Rank 1's last unit holds 16 real elements and one of padding.
    assert len(ranks[1]["inline"]["steps"][0]["local"]["3._flat_param"]) == 16


def test_averaged_shards_are_the_float64_average_of_the_gathered_snapshots(fsdp1_run):
    ranks = ranks_of(fsdp1_run)
    states = [step["state"] for step in ranks[0]["inline"]["steps"]]
    assert states == [step["state"] for step in ranks[1]["inline"]["steps"]]  # one model
    assert states[-1] != states[-2]  # it trains: an average is not the newest snapshot
    oracle = mean64(states[-WINDOW:])
    for rank, data in enumerate(ranks):
        average = {k: torch.tensor(v, dtype=torch.float64) for k, v in data["inline"]["average"].items()}
        for unit in UNITS:
            torch.testing.assert_close(average[unit], flat_shard(oracle, unit, rank), rtol=0, atol=1e-6)
        torch.testing.assert_close(average["2.running_mean"], oracle["2.running_mean"], rtol=0, atol=1e-6)
        # Every avg evaluation saw the whole averaged model (gathered inside the task), on every rank.
        seen_avg = data["inline"]["seen"][:10][1::2]  # (raw, avg) per step; the resumed monitor's follow
        for index, seen in enumerate(seen_avg):
            window = mean64(states[max(0, index + 1 - WINDOW) : index + 1])
            for key, value in seen.items():
                torch.testing.assert_close(
                    torch.tensor(value, dtype=torch.float64), window[key].double(), rtol=0, atol=1e-6
                )
        # And the live shards came back bit for bit after every snapshot.
        assert all(step["restored"] for step in data["inline"]["steps"])


def test_no_shard_snapshots_full_weights_and_evaluates_the_average_it_swapped_in(fsdp1_run):
    """NO_SHARD's state_dict() clones: an average written into those clones never reached the model, and
    every avg evaluation evaluated the raw weights. The snapshot now takes views of the flat parameters."""
    ranks = ranks_of(fsdp1_run)
    states = [step["state"] for step in ranks[0]["no_shard"]["steps"]]
    assert states == [step["state"] for step in ranks[1]["no_shard"]["steps"]]  # replicated
    assert states[-1] != states[-2]
    # The full-weights path: rank 0 buffers whole, originally named tensors (no flat parameters).
    buffer = fsdp1_run / "no-shard" / "buffer"
    assert not list(buffer.glob("rank-*"))
    files = sorted(buffer.glob("*.safetensors"))
    assert [f.name for f in files] == ["step-00000003.safetensors", "step-00000004.safetensors"]
    for step, path in zip((3, 4), files, strict=True):
        stored = read_file(path)
        assert set(stored) == set(states[step - 1])
        for name, value in as64(states[step - 1]).items():
            assert torch.equal(stored[name].double(), value), (step, name)
    for data in ranks:
        seen = data["no_shard"]["seen"]
        assert len(seen) == 2 * len(states)  # raw and avg at every snapshot
        for index, state in enumerate(states):
            raw, avg = seen[2 * index], seen[2 * index + 1]
            assert raw == state
            window = mean64(states[max(0, index - 1) : index + 1])
            assert set(avg) == set(window)
            for key, value in as64(avg).items():
                torch.testing.assert_close(value, window[key].double(), rtol=0, atol=1e-6)
            if index:  # from the second snapshot on, the average is not the raw model
                assert avg != raw
        assert all(step["restored"] for step in data["no_shard"]["steps"])


def test_no_full_gather_per_snapshot_only_one_per_export(fsdp1_run):
    ranks = ranks_of(fsdp1_run)
    units = ranks[0]["inline"]["units"]
    assert units == 3
    # The counters see FSDP1's gathers: its default state_dict() unshards every unit.
    for data in ranks:
        assert data["inline"]["probe"].get("unshard") == units
        assert (
            data["inline"]["probe"].get("all_gather", 0)
            + data["inline"]["probe"].get("all_gather_into_tensor", 0)
            > 0
        )
    exported = [step["exported"] for step in ranks[0]["inline"]["steps"]]  # best.json is rank 0's
    assert any(exported) and not all(exported)
    for data in ranks:
        for step, was_exported in zip(data["inline"]["steps"], exported, strict=True):
            # Outside the tasks' own forward passes: nothing at a snapshot, one gather of the model
            # (each unit unsharded once) when a new best is exported.
            assert step["gathers"].get("unshard", 0) == (units if was_exported else 0), step["gathers"]
            if not was_exported:
                assert step["gathers"] == {}


def test_the_export_is_the_gathered_float64_average(fsdp1_run):
    ranks = ranks_of(fsdp1_run)
    inline = ranks[0]["inline"]
    # The trajectory after the resume from step 3: steps 1-3, then the resumed 4 and 5.
    states = {i + 1: step["state"] for i, step in enumerate(inline["steps"][:3])}
    states.update({4 + i: step["state"] for i, step in enumerate(inline["resumed"]["steps"])})
    run = fsdp1_run / "run"
    best = json.loads((run / "best.json").read_text())
    exported = read_file(run / best["path"] / "model.safetensors")
    want = (
        mean64([states[s] for s in best["steps"]]) if best["variant"] == "avg" else as64(states[best["step"]])
    )
    assert set(exported) == set(states[1])  # the unwrapped model's names, not flat parameters
    for key, value in exported.items():
        torch.testing.assert_close(value.double(), want[key].double(), rtol=0, atol=1e-6)
    assert json.loads((run / "run.json").read_text()) == {"world_size": 2, "sharded": True}


def test_resume_with_the_same_world_size_continues_the_window(fsdp1_run):
    ranks = ranks_of(fsdp1_run)
    for data in ranks:
        inline = data["inline"]
        window = [inline["steps"][2]["local"], *(s["local"] for s in inline["resumed"]["steps"])]
        average = inline["resumed"]["average"]
        for unit in UNITS:
            want = sum(torch.tensor(w[unit], dtype=torch.float64) for w in window) / len(window)
            got = torch.tensor(average[unit], dtype=torch.float64)
            torch.testing.assert_close(got[: want.numel()], want, rtol=0, atol=1e-6)
    history = [json.loads(line) for line in (fsdp1_run / "run" / "history.jsonl").read_text().splitlines()]
    scores = [(h["step"], h["task"], h["variant"], h["window"]) for h in history if "error" not in h]
    assert len(scores) == len(set(scores))  # the abandoned steps 4 and 5 were dropped, not duplicated
    assert {s[0] for s in scores} == {1, 2, 3, 4, 5}


def test_another_world_size_is_refused(fsdp1_run):
    monitor = StabilityMonitor([], dirpath=fsdp1_run / "run", console=False)
    with pytest.raises(ValueError, match="2 ranks"):
        monitor.open(resume_step=5)


def test_a_background_evaluator_puts_fsdp1_shards_together(fsdp1_run):
    """use_orig_params=True: the flat parameter holds alignment padding between parameters, which the
    layout recorded in each rank's manifest skips."""
    assert_a_background_evaluator_puts_the_run_together(fsdp1_run, hidden=10)


def accuracy(weights: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """The adapters' MLP (Linear, Tanh, Linear) in plain torch."""
    w = {k: v.float() for k, v in weights.items()}
    hidden = torch.tanh(x @ w[f"{prefix}0.weight"].T + w[f"{prefix}0.bias"])
    logits = hidden @ w[f"{prefix}2.weight"].T + w[f"{prefix}2.bias"]
    return (logits.argmax(-1) == y).double().mean().item()


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("lightning_fsdp1", "net."),
        ("lightning_fsdp2", "net."),
        ("transformers_fsdp1", ""),
        ("transformers_fsdp2", ""),
    ],
)
def test_callbacks_snapshot_fsdp1_and_fsdp2_models_shard_by_shard(fsdp1_run, name, prefix):
    """Each callback handed the module its framework hands it (the inner one under FSDP1): rank-local
    shard files, the avg score of the float64 window average, records equal on both ranks."""
    ranks = ranks_of(fsdp1_run)
    x, y = torch.tensor(ranks[0]["x"]), torch.tensor(ranks[0]["y"])
    results = [data["adapters"][name] for data in ranks]
    assert results[0]["records"] == results[1]["records"]
    states = results[0]["states"]
    run = fsdp1_run / name
    assert json.loads((run / "run.json").read_text()) == {"world_size": 2, "sharded": True}
    for rank in (0, 1):
        files = sorted((run / "buffer" / f"rank-{rank}").glob("*.safetensors"))
        assert [f.name for f in files] == ["step-00000002.safetensors", "step-00000003.safetensors"]
        stored = read_file(files[-1])
        full = as64(states[-1])
        # FSDP1 stores flat shards, FSDP2 dim-0 chunks: in both, fewer elements than the model.
        assert sum(t.numel() for t in stored.values()) < sum(t.numel() for t in full.values())
    records = {(r["task"], r["variant"]): r for r in results[0]["records"]}
    average = mean64(states[-2:])
    assert records[("cls", "avg")]["score"] == pytest.approx(accuracy(average, prefix, x, y), abs=1e-12)
    assert records[("cls", "raw")]["score"] == pytest.approx(
        accuracy(as64(states[-1]), prefix, x, y), abs=1e-12
    )


def test_an_fsdp1_module_without_its_root_is_refused(fsdp1_run):
    for data in ranks_of(fsdp1_run):
        error = data["adapters"]["rootless"]
        assert error is not None and error.startswith("UnsupportedShardingError")
        assert "root" in error and "trainer.strategy.model" in error and "model_wrapped" in error
