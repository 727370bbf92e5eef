"""Reading, checking, averaging and loading saved checkpoints, against safetensors' own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint_stability.offline.analysis import AnalysisError, order_series
from checkpoint_stability.storage import checkpoint_files
from checkpoint_stability.storage.checkpoint_files import (
    CheckpointError,
    ModelLoader,
    average_checkpoints,
    check_series,
    load_state,
    resolve_checkpoint,
)


def reference_average(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Float64 sum in series order, one division, rounded to the stored dtype; others from the last."""
    out = {}
    for name, last in state_dicts[-1].items():
        if last.is_floating_point():
            out[name] = (sum(s[name].to(torch.float64) for s in state_dicts) / len(state_dicts)).to(
                last.dtype
            )
        else:
            out[name] = last
    return out


def write(path: Path, seed: int, **extra) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "big": torch.randn(37, 5, generator=generator),
        "bf": torch.randn(11, 3, generator=generator).bfloat16(),
        "scalar": torch.randn((), generator=generator),
        "empty": torch.zeros(0, 3),
        "steps": torch.tensor(seed),
        **extra,
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_chunked_average_equals_the_whole_tensor_definition(tmp_path, monkeypatch):
    # Chunks of 7 elements: "big" is averaged one row (5 elements) at a time, "bf" two rows at a time.
    monkeypatch.setattr(checkpoint_files, "CHUNK_ELEMENTS", 7)
    inputs = [write(tmp_path / f"{i}.safetensors", i) for i in range(4)]
    out = average_checkpoints(inputs, tmp_path / "avg.safetensors")
    expected = reference_average([load_file(p) for p in inputs])
    actual = load_file(out)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), name


def test_sharded_average_keeps_only_one_shard_per_checkpoint_open(tmp_path, monkeypatch):
    """Streaming: while a shard is written, only the matching shard of each input is mapped."""
    inputs = []
    for i in range(3):
        directory = tmp_path / f"ckpt-{i}"
        directory.mkdir()
        weight_map = {}
        for shard in range(3):
            name = f"model-{shard + 1:05d}-of-00003.safetensors"
            save_file(
                {f"layer{shard}.w": torch.randn(4, 4)}, str(directory / name), metadata={"format": "pt"}
            )
            weight_map[f"layer{shard}.w"] = name
        index = {"metadata": {"total_size": 3 * 64}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        (directory / "config.json").write_text('{"model_type": "toy"}')
        inputs.append(directory)
    opened, peak = [], []
    real_safe_open = checkpoint_files.safe_open

    class Counting:
        def __init__(self, path, framework):
            self.handle = real_safe_open(path, framework=framework)

        def __enter__(self):
            opened.append(self)
            peak.append(len(opened))
            return self.handle.__enter__()

        def __exit__(self, *exc):
            opened.remove(self)
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoint_files, "safe_open", Counting)
    out = average_checkpoints(inputs, tmp_path / "avg")
    monkeypatch.undo()
    assert max(peak) == len(inputs)
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((inputs[-1] / "model.safetensors.index.json").read_text())["weight_map"]
    )
    merged = [
        {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for p in inputs
    ]
    expected = reference_average(merged)
    for name, file_name in index["weight_map"].items():
        assert torch.equal(load_file(out / file_name)[name], expected[name])


def test_series_errors_name_the_first_differing_tensor_and_both_checkpoints(tmp_path):
    a = resolve_checkpoint(write(tmp_path / "a.safetensors", 0))
    b = resolve_checkpoint(write(tmp_path / "b.safetensors", 1, zeta=torch.zeros(2), alpha=torch.zeros(1)))
    with pytest.raises(
        CheckpointError, match=r"tensor 'alpha' is in checkpoint .*b\.safetensors but not in .*a\."
    ):
        check_series([a, b])
    check_series([a, a])


def test_index_must_name_files_beside_it_that_hold_its_tensors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "shard.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../shard.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"not a \.safetensors file name in the index's own directory"):
        resolve_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"w": "shard.safetensors", "v": "shard.safetensors"}}))
    with pytest.raises(
        CheckpointError, match=r"maps tensor 'v' to shard\.safetensors, which does not hold it"
    ):
        resolve_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
    assert resolve_checkpoint(tmp_path).layout == "sharded"


def test_a_damaged_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"cannot read .*damaged\.safetensors as safetensors"):
        resolve_checkpoint(path)


def test_load_state_restores_the_aliases_this_library_records(tmp_path):
    path = tmp_path / "step-00000100.safetensors"
    save_file(
        {"embed.weight": torch.ones(3, 2)}, str(path), metadata={"aliases": '{"head.weight": "embed.weight"}'}
    )
    state = load_state(path)
    assert state["head.weight"] is state["embed.weight"]


class Tied(torch.nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(3, width)
        self.head = torch.nn.Linear(width, 3, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head and wte
        self.norm = torch.nn.LayerNorm(width)


def test_model_loader_fills_tied_groups_from_the_stored_name(tmp_path):
    model = Tied()
    tensors = {
        "embed.weight": torch.arange(6.0).reshape(3, 2),
        "norm.weight": torch.ones(2),
        "norm.bias": torch.ones(2),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"))  # no head.weight: dropped as a tied duplicate
    save_file({k: v * 3 for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    loader = ModelLoader(model, tmp_path / "a.safetensors")
    loader.load(tmp_path / "a.safetensors")
    assert torch.equal(model.head.weight, tensors["embed.weight"])
    loader.load_average([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert torch.equal(model.head.weight, tensors["embed.weight"] * 2)
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("norm.bias"), "the model's tensor 'norm.bias' is missing from checkpoint"),
        (lambda t: t.update(extra=torch.zeros(1)), "has tensor 'extra', which the model does not have"),
        (
            lambda t: t.update({"norm.weight": torch.ones(3)}),
            r"tensor 'norm.weight' has shape \(3,\) in checkpoint",
        ),
    ],
)
def test_model_loader_refuses_another_model_naming_the_tensor(tmp_path, change, message):
    tensors = {"embed.weight": torch.zeros(3, 2), "norm.weight": torch.ones(2), "norm.bias": torch.ones(2)}
    change(tensors)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        ModelLoader(model, tmp_path / "a.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_steps_order_the_series(tmp_path):
    paths = {}
    for step in (1000, 500, 20):
        paths[step] = tmp_path / f"checkpoint-{step}"
        paths[step].mkdir()
        write(paths[step] / "model.safetensors", step)
    # A shell glob sorts checkpoint-1000 before checkpoint-500; the series is in step order.
    series = order_series(sorted(paths.values()))
    assert series.steps == [20, 500, 1000] and series.step_source == "names"
    assert [c.path for c in series.checkpoints] == [paths[20], paths[500], paths[1000]]

    other = tmp_path / "final"
    other.mkdir()
    write(other / "model.safetensors", 7)
    (other / "trainer_state.json").write_text(json.dumps({"global_step": 1200}))
    assert order_series([other, paths[500]]).steps == [500, 1200]

    anonymous = write(tmp_path / "anonymous.safetensors", 8)
    series = order_series([paths[1000], anonymous, paths[20]])
    assert series.steps == [1, 2, 3] and series.step_source == "positions"
    assert [c.path for c in series.checkpoints] == [paths[1000], anonymous, paths[20]]

    with pytest.raises(AnalysisError, match="are both step 500"):
        order_series([paths[500], paths[500] / "model.safetensors"])


def test_a_file_output_names_a_file_and_keeps_metadata(tmp_path):
    inputs = [write(tmp_path / f"{i}.safetensors", i) for i in range(2)]
    with pytest.raises(CheckpointError, match=r"must end in \.safetensors"):
        average_checkpoints(inputs, tmp_path / "avg")
    out = average_checkpoints(inputs, tmp_path / "avg.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    # The inputs' metadata, plus the marker that lets --overwrite replace this average later.
    marker = json.loads(metadata.pop("checkpoint_stability_average"))
    assert metadata == {"format": "pt"}
    assert marker["written_by"] == "checkpoint-stability average" and marker["inputs"] == list(
        map(str, inputs)
    )
    assert not list(tmp_path.glob(".*partial*"))
