"""``checkpoint-stability average`` against hostile or unusual inputs, with independent oracles.

Oracles: tensors read back with safetensors' own reader (``safe_open``); averages computed here in
float64 (complex128) with numpy from those reads; float8 roundings checked against a table of every
value the dtype can hold; files compared byte for byte before and after a refused or failed command.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint_stability.offline.cli import main
from checkpoint_stability.storage import checkpoint_files
from checkpoint_stability.storage.checkpoint_files import (
    CheckpointError,
    average_checkpoints,
    iter_average,
    resolve_checkpoint,
)

MARKER = "checkpoint-stability-average.json"


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def run(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    # A fresh CLI log handler, bound to this test's captured stderr (an earlier test's handler would
    # write to that test's capture).
    monkeypatch.setattr(logging.getLogger("checkpoint_stability"), "handlers", [])
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def model_dir(path: Path, seed: int, **extra) -> Path:
    """A save_pretrained-like directory: model.safetensors and config.json."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "w": torch.randn(4, 3, generator=generator),
        "b": torch.randn(3, generator=generator).bfloat16(),
        "n": torch.tensor([seed, 7]),
        **extra,
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "seed": seed}))
    return path


def read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or of the .safetensors files of a directory."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}


def numpy_mean(states: list[dict[str, torch.Tensor]], name: str) -> np.ndarray:
    """The float64 (complex128) mean, summed in series order, computed with numpy."""
    wide = np.complex128 if states[0][name].is_complex() else np.float64
    values = [
        state[name].to(torch.complex128 if wide is np.complex128 else torch.float64).numpy()
        for state in states
    ]
    total = np.zeros_like(values[0], dtype=wide)
    for value in values:
        total = total + value
    return total / len(values)


def oracle(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating and complex tensors: the numpy mean rounded to the stored dtype; others from the last."""
    out = {}
    for name, last in states[-1].items():
        if last.is_floating_point() or last.is_complex():
            out[name] = torch.from_numpy(numpy_mean(states, name)).to(last.dtype)
        else:
            out[name] = last
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def tree(root: Path) -> dict[str, object]:
    """Every entry under root: file bytes, link targets, directories; nothing followed."""
    out: dict[str, object] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = "dir"
            elif path.is_file():
                out[key] = path.read_bytes()
            else:
                out[key] = "special"
    return out


# ------------------------------------------------------------------------------------------------ S2


def test_side_file_links_out_of_the_checkpoint_are_not_copied_and_files_get_one_mode(
    tmp_path, capsys, monkeypatch, umask_022
):
    inputs = [model_dir(tmp_path / f"checkpoint-{i}", i) for i in (1, 2)]
    last = inputs[-1]
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    secret.chmod(0o600)
    (last / "tokenizer.json").symlink_to(secret)  # refused: outside the checkpoint
    (last / "sub").mkdir()
    (last / "sub" / "vocab.txt").write_text("a\nb\n")
    (last / "vocab.txt").symlink_to("sub/vocab.txt")  # accepted: stays inside the checkpoint
    os.mkfifo(last / "merges.txt")  # refused: not a regular file (copying it would block forever)
    (last / "config.json").chmod(0o600)  # a private source mode does not carry over
    out = tmp_path / "avg"

    code, stdout, err = run(["average", *inputs, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 0, err
    assert "averaged 2 checkpoints" in stdout
    assert_same(read(out), oracle([read(p) for p in inputs]))
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "vocab.txt", MARKER]
    )
    assert (out / "vocab.txt").read_text() == "a\nb\n" and not (out / "vocab.txt").is_symlink()
    assert (out / "config.json").read_bytes() == (last / "config.json").read_bytes()
    # One warning line per refused file, naming it and where it points.
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    [tokenizer_line] = [line for line in lines if "tokenizer.json" in line]
    assert str(secret.resolve()) in tokenizer_line
    [merges_line] = [line for line in lines if "merges.txt" in line]
    assert "FIFO" in merges_line
    # Every output file has the same mode, whatever the source's.
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def hf_cache(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """A Hugging Face hub cache: two snapshots of models--org--tiny whose files link into its blobs,
    one side file linking into another repository's blobs."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()

    def blob(folder: Path, data: bytes) -> Path:
        path = folder / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        return path

    other_blobs = hub / "models--evil--other" / "blobs"
    other_blobs.mkdir(parents=True)
    foreign = blob(other_blobs, b"another repository's file\n")
    snapshots = []
    for seed, revision in enumerate(("a1b2c3", "d4e5f6")):
        staging = model_dir(tmp_path / f"staging-{seed}", seed)
        (staging / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            target = blob(repo / "blobs", (staging / name).read_bytes())
            (snapshot / name).symlink_to(Path("..", "..", "blobs", target.name))
        (snapshot / "vocab.txt").symlink_to(
            Path("..", "..", "..", "models--evil--other", "blobs", foreign.name)
        )
        snapshots.append(snapshot)
    (repo / "refs" / "main").write_text("d4e5f6")
    return repo, snapshots, foreign


def test_hugging_face_cache_links_into_the_same_repository_are_copied(tmp_path, capsys, monkeypatch):
    repo, snapshots, foreign = hf_cache(tmp_path)
    out = tmp_path / "avg"

    code, _, err = run(["average", *snapshots, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 0, err
    assert_same(read(out), oracle([read(p) for p in snapshots]))
    for name in ("config.json", "tokenizer.json"):
        copied = out / name
        assert not copied.is_symlink() and copied.read_bytes() == (snapshots[-1] / name).read_bytes()
    assert not (out / "vocab.txt").exists()
    [line] = [line for line in err.strip().splitlines() if "vocab.txt" in line]
    assert str(foreign.resolve()) in line

    # An output that would hold the repository's blobs (the inputs' real files) is refused.
    before = tree(repo)
    code, _, err = run(["average", *snapshots, "-o", repo, "--overwrite"], capsys, monkeypatch)
    assert code == 2 and "contains" in assert_one_error_line(err)
    assert tree(repo) == before


# ------------------------------------------------------------------------------------------------ B1


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("where", ["contains", "equals", "inside"])
def test_output_that_contains_equals_or_is_inside_an_input_is_refused(
    tmp_path, capsys, monkeypatch, where, overwrite
):
    out = tmp_path / "out"
    inputs = [model_dir(out / f"checkpoint-{i}", i) for i in (1, 2)]
    model_dir(out / "checkpoint-3", 3)  # a bystander
    before = tree(out)
    target = {"contains": out, "equals": inputs[1], "inside": inputs[1] / "avg"}[where]
    argv = ["average", *inputs, "-o", target, "--no-progress", *(["--overwrite"] if overwrite else [])]

    code, _, err = run(argv, capsys, monkeypatch)

    assert code == 2
    line = assert_one_error_line(err)
    assert str(target) in line
    assert {
        "contains": "contains the input",
        "equals": "is one of the input checkpoints",
        "inside": "is inside the input",
    }[where] in line
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_a_previous_average_directory_only(tmp_path, capsys, monkeypatch):
    inputs = [model_dir(tmp_path / f"checkpoint-{i}", i) for i in range(3)]
    precious = model_dir(tmp_path / "my-model", 9)
    (precious / "notes.txt").write_text("keep me")
    before = tree(precious)

    code, _, err = run(["average", *inputs, "-o", precious, "--overwrite"], capsys, monkeypatch)
    assert code == 2
    assert "not an average written by checkpoint-stability" in assert_one_error_line(err)
    assert tree(precious) == before

    avg = tmp_path / "avg"
    code, _, err = run(["average", *inputs[:2], "-o", avg, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    marker = json.loads((avg / MARKER).read_text())
    assert (
        marker["inputs"] == [str(p) for p in inputs[:2]]
        and marker["written_by"] == "checkpoint-stability average"
    )

    code, _, err = run(["average", *inputs, "-o", avg, "--no-progress"], capsys, monkeypatch)
    assert code == 2 and "already exists" in assert_one_error_line(err)

    # The old average stays whole while the new one is written beside it.
    real_save_file = checkpoint_files.save_file
    old = tree(avg)
    seen = []

    def watching(tensors, filename, metadata=None):
        seen.append(tree(avg) == old and not Path(filename).is_relative_to(avg))
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_files, "save_file", watching)
    code, _, err = run(["average", *inputs, "-o", avg, "--overwrite", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert seen == [True]
    assert_same(read(avg), oracle([read(p) for p in inputs]))
    assert json.loads((avg / MARKER).read_text())["inputs"] == [str(p) for p in inputs]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["avg", "my-model", *(p.name for p in inputs)]
    )


def test_without_an_atomic_exchange_the_swap_puts_the_old_average_back_on_failure(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing the directories are swapped through a second name; a
    failure between the two renames restores the previous average."""
    inputs = [model_dir(tmp_path / f"checkpoint-{i}", i) for i in range(3)]
    avg = tmp_path / "avg"
    average_checkpoints(inputs[:2], avg)
    monkeypatch.setattr(checkpoint_files, "_exchange", lambda a, b: False)
    before = tree(tmp_path)
    real_replace = os.replace

    def failing(source, target):
        if Path(source).name.startswith(".avg.partial-"):
            raise enospc()
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(
        checkpoint_files.AverageWriteError, match=r"No space left on device.*previous average"
    ):
        average_checkpoints(inputs, avg, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert tree(tmp_path) == before

    average_checkpoints(inputs, avg, overwrite=True)
    assert_same(read(avg), oracle([read(p) for p in inputs]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["avg", *(p.name for p in inputs)])


def test_a_marker_that_is_a_link_or_damaged_does_not_make_a_directory_replaceable(tmp_path):
    inputs = [model_dir(tmp_path / f"checkpoint-{i}", i) for i in range(2)]
    elsewhere = tmp_path / "marker.json"
    elsewhere.write_text(json.dumps({"written_by": "checkpoint-stability average"}))
    for plant in (
        lambda marker: marker.symlink_to(elsewhere),
        lambda marker: marker.write_text("[" * 100_000),
        lambda marker: marker.write_text('{"written_by": "someone else"}'),
    ):
        target = tmp_path / "target"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        (target / "weights.bin").write_bytes(b"precious")
        plant(target / MARKER)
        before = tree(target)
        with pytest.raises(CheckpointError, match="not an average written by checkpoint-stability"):
            average_checkpoints(inputs, target, overwrite=True)
        assert tree(target) == before


def test_overwrite_replaces_a_previous_average_file_only(tmp_path, capsys, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        save_file(
            {"w": torch.randn(5, generator=generator)}, str(path), metadata={"format": "pt", "by": str(i)}
        )
        inputs.append(path)
    precious = tmp_path / "final.safetensors"
    save_file({"w": torch.ones(5)}, str(precious))
    before = precious.read_bytes()

    code, _, err = run(["average", *inputs, "-o", precious, "--overwrite"], capsys, monkeypatch)
    assert code == 2
    assert "not an average written by checkpoint-stability" in assert_one_error_line(err)
    assert precious.read_bytes() == before

    avg = tmp_path / "avg.safetensors"
    code, _, err = run(["average", *inputs[:2], "-o", avg, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run(["average", *inputs, "-o", avg, "--overwrite", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert_same(read(avg), oracle([read(p) for p in inputs]))
    with safe_open(str(avg), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["by"] == "2"
    assert json.loads(metadata["checkpoint_stability_average"])["inputs"] == [str(p) for p in inputs]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["avg.safetensors", "final.safetensors", *(p.name for p in inputs)]
    )


# ------------------------------------------------------------------------------------------------ B8


FLOAT8 = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


def representable(dtype: torch.dtype) -> np.ndarray:
    """Every finite value of a one-byte float dtype, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float64).numpy()
    return np.unique(values[np.isfinite(values)])


def test_float8_checkpoints_average_in_their_own_dtype(tmp_path, capsys, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    inputs = []
    for i in range(3):
        tensors = {"f32": torch.randn(6, generator=generator)}
        for name, dtype in FLOAT8.items():
            if dtype == torch.float8_e8m0fnu:  # powers of two only
                raw = 2.0 ** torch.randint(-6, 7, (4, 5), generator=generator).double()
            else:
                raw = 3 * torch.randn(4, 5, generator=generator)
            tensors[name] = raw.to(dtype)
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path))
        inputs.append(path)
    out = tmp_path / "avg.safetensors"

    code, _, err = run(["average", *inputs, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 0, err
    stored = dtypes(out)
    states = [read(p) for p in inputs]
    averaged = read(out)
    for name in FLOAT8:
        assert stored[name] == name  # written back in its own dtype
        mean = numpy_mean(states, name).ravel()
        got = averaged[name].to(torch.float64).numpy().ravel()
        table = representable(FLOAT8[name])
        nearest = np.abs(table[None, :] - mean[:, None]).min(axis=1)
        # Correctly rounded: no value of the dtype is closer to the float64 mean.
        assert np.array_equal(np.abs(got - mean), nearest), name
    assert torch.equal(averaged["f32"], oracle(states)["f32"])
    # analyze loads averages through iter_average: the same values.
    for name, value in iter_average(inputs):
        assert value.dtype == averaged[name].dtype and torch.equal(
            value.view(torch.uint8) if value.element_size() == 1 else value,
            averaged[name].view(torch.uint8) if value.element_size() == 1 else averaged[name],
        ), name


def crafted(path: Path, dtype: str, shape: list[int], nbytes: int) -> Path:
    """A safetensors file written by hand: one tensor 'w' of a dtype torch cannot compute with."""
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(nbytes)))
    return path


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"), [("F4", [2, 4], 4), ("F6_E2M3", [4], 3), ("F6_E3M2", [8], 6)]
)
def test_float4_and_float6_are_refused_naming_the_tensor_and_dtype(
    tmp_path, capsys, monkeypatch, dtype, shape, nbytes
):
    inputs = [crafted(tmp_path / f"{i}.safetensors", dtype, shape, nbytes) for i in range(2)]
    out = tmp_path / "avg.safetensors"

    code, _, err = run(["average", *inputs, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 2
    line = assert_one_error_line(err)
    assert "'w'" in line and dtype in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]
    with pytest.raises(CheckpointError, match=f"'w'.*{dtype}"):
        list(iter_average(inputs))


# ------------------------------------------------------------------------------------------------ full disk


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def inject_safetensors(monkeypatch):
    # What safetensors itself raises when the disk fills: its own error type, after a partial write.
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_files, "save_file", full)


def inject_oserror_in_save_file(monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise enospc()

    monkeypatch.setattr(checkpoint_files, "save_file", full)


def inject_side_file_copy(monkeypatch):
    def full(source, target, *args, **kwargs):
        target.write(source.read(3))
        raise enospc()

    monkeypatch.setattr(shutil, "copyfileobj", full)


def inject_fsync(monkeypatch):
    # A file system that allocates late reports the full disk at fsync.
    def full(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize(
    "inject",
    [inject_safetensors, inject_oserror_in_save_file, inject_side_file_copy, inject_fsync],
    ids=["safetensors-error", "oserror", "side-file", "fsync"],
)
@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing_behind(
    tmp_path, capsys, monkeypatch, inject, previous
):
    inputs = [model_dir(tmp_path / f"checkpoint-{i}", i) for i in range(3)]
    (inputs[-1] / "tokenizer.json").write_text('{"version": "1.0"}')
    avg = tmp_path / "avg"
    if previous:
        code, _, err = run(["average", *inputs[:2], "-o", avg, "--no-progress"], capsys, monkeypatch)
        assert code == 0, err
    before = tree(tmp_path)

    inject(monkeypatch)
    code, _, err = run(["average", *inputs, "-o", avg, "--overwrite", "--no-progress"], capsys, monkeypatch)
    monkeypatch.undo()

    assert code == 2
    line = assert_one_error_line(err)
    assert "No space left on device" in line and str(avg) in line
    assert ("the previous average is unchanged" if previous else "nothing was written") in line
    assert tree(tmp_path) == before  # inputs, previous output, and no partial files


# ------------------------------------------------------------------------------------------------ NaN


def test_nan_weights_are_averaged_with_a_warning_naming_the_tensor_and_checkpoint(
    tmp_path, capsys, monkeypatch
):
    generator = torch.Generator().manual_seed(5)
    inputs = []
    for i in range(3):
        w = torch.randn(3, 4, generator=generator)
        if i == 1:
            w[1, 2] = float("nan")
        path = tmp_path / f"step-{i}.safetensors"
        save_file({"w": w, "clean": torch.randn(2, generator=generator)}, str(path))
        inputs.append(path)
    out = tmp_path / "avg.safetensors"

    code, _, err = run(["average", *inputs, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 0
    averaged, expected = read(out), oracle([read(p) for p in inputs])
    assert torch.isnan(averaged["w"][1, 2])
    assert torch.equal(torch.isnan(averaged["w"]), torch.isnan(expected["w"]))
    assert torch.equal(averaged["w"].nan_to_num(), expected["w"].nan_to_num())
    assert torch.equal(averaged["clean"], expected["clean"])
    [line] = [line for line in err.strip().splitlines() if "NaN" in line]
    assert "'w'" in line and str(inputs[1]) in line
    assert "'clean'" not in line and str(inputs[0]) not in line and str(inputs[2]) not in line


# ------------------------------------------------------------------------------------------------ complex


def test_complex_tensors_are_averaged_in_complex128(tmp_path):
    generator = torch.Generator().manual_seed(11)
    inputs = []
    for i in range(4):
        z = torch.complex(torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator))
        path = tmp_path / f"{i}.safetensors"
        save_file({"rotary": z, "w": torch.randn(2, generator=generator)}, str(path))
        inputs.append(path)

    out = average_checkpoints(inputs, tmp_path / "avg.safetensors")

    assert dtypes(out)["rotary"] == "C64"
    states = [read(p) for p in inputs]
    values = [s["rotary"].numpy().astype(np.complex128) for s in states]
    expected = ((values[0] + values[1] + values[2] + values[3]) / 4).astype(np.complex64)
    assert np.array_equal(read(out)["rotary"].numpy(), expected)
    assert not torch.equal(read(out)["rotary"], states[-1]["rotary"])
    assert_same(read(out), oracle(states))


# ------------------------------------------------------------------------------------------------ B4


def sharded(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(2, generator=generator)}, str(path / "model-1.safetensors"))
    save_file({"b": torch.randn(2, generator=generator)}, str(path / "model-2.safetensors"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


DAMAGED_INDEXES = {
    "nested": "[" * 100_000 + "]" * 100_000,
    "nested-weight-map": '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "list": '[{"weight_map": {"a": "model-1.safetensors"}}]',
    "weight-map-list": '{"weight_map": [["a", "model-1.safetensors"]]}',
    "weight-map-of-ints": '{"weight_map": {"a": 1, "b": 2}}',
    "weight-map-of-objects": '{"weight_map": {"a": {"file": "model-1.safetensors"}}}',
    "not-utf8": b'{"weight_map": {"a": "\xff\xfe"}}',
    "truncated": '{"weight_map": {"a": "model-1.safe',
}


@pytest.mark.parametrize("damage", list(DAMAGED_INDEXES))
@pytest.mark.parametrize("argument", ["directory", "index"])
def test_a_damaged_index_is_one_line_exit_2_naming_it(tmp_path, capsys, monkeypatch, damage, argument):
    inputs = [sharded(tmp_path / f"checkpoint-{i}", i) for i in range(2)]
    index = inputs[1] / "model.safetensors.index.json"
    data = DAMAGED_INDEXES[damage]
    index.write_bytes(data if isinstance(data, bytes) else data.encode())
    given = [p if argument == "directory" else p / "model.safetensors.index.json" for p in inputs]

    code, _, err = run(["average", *given, "-o", tmp_path / "avg", "--no-progress"], capsys, monkeypatch)

    assert code == 2
    assert str(index) in assert_one_error_line(err)
    assert not (tmp_path / "avg").exists()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        resolve_checkpoint(given[1])


@pytest.mark.parametrize(
    "aliases",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "[1, 2]",
        "{not json",
        "NaN",
    ],
    ids=["nested", "nested-value", "list", "malformed", "nan"],
)
def test_damaged_aliases_metadata_is_one_line_exit_2_naming_the_file(tmp_path, capsys, monkeypatch, aliases):
    good = tmp_path / "0.safetensors"
    save_file({"embed": torch.ones(2)}, str(good), metadata={"aliases": '{"head": "embed"}'})
    bad = tmp_path / "1.safetensors"
    save_file({"embed": torch.zeros(2)}, str(bad), metadata={"aliases": aliases})
    out = tmp_path / "avg.safetensors"

    code, _, err = run(["average", good, bad, "-o", out, "--no-progress"], capsys, monkeypatch)

    assert code == 2
    line = assert_one_error_line(err)
    assert str(bad) in line and "aliases" in line
    assert not out.exists()
    assert resolve_checkpoint(good).aliases == {"head": "embed"}
