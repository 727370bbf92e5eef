"""Saved checkpoints on disk: find their tensors, check a series fits together, average it, load it.

A checkpoint argument is one of

* a Hugging Face model directory holding ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (what ``save_pretrained`` and the ``Trainer`` write);
* a ``.safetensors`` file;
* the index ``.json`` of a sharded checkpoint (its shards beside it).

Nothing here holds more than one checkpoint's worth of tensors at a time: tensors are read through
``safetensors.safe_open`` one at a time (memory-mapped, so reading a tensor reads only its bytes), and
an average is computed tensor by tensor across all the files of the series. Only safetensors and JSON
are read: pickle files (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) are refused, since loading one runs
arbitrary code.

Tied weights: ``save_pretrained`` and ``safetensors.torch.save_model`` store a tensor shared under
several names once, under one of them; a model re-ties the others when it is built. So averaging
handles the stored names only (the output drops the same duplicates as its inputs), and loading into a
model fills a tied group of parameters from whichever of its names the file stores. Snapshots and
exports written by this library record the dropped names in their ``"aliases"`` metadata; those count
as stored too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_stability.state import tied_groups

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a model directory needs besides its weights to load as a model (and tokenize): copied from the
# newest checkpoint of a series to the output of an average. Optimizer, scheduler and RNG states of a
# Trainer checkpoint are not: they belong to one training step, not to an average.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Rows of a tensor averaged at once: bounds the float64 accumulator to 64 MiB whatever the tensor size.
CHUNK_ELEMENTS = 8 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or checkpoints that do not fit together (or into a model)."""


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: str
    """The safetensors dtype name (``"F32"``, ``"BF16"``, ``"I64"``...)."""
    shape: tuple[int, ...]

    @property
    def is_floating(self) -> bool:
        """Floating-point tensors are averaged; the others are taken from the newest checkpoint."""
        return self.dtype.startswith("F") or self.dtype == "BF16"


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint, resolved to its tensor files; only headers have been read.

    ``layout`` is ``"file"`` (a bare ``.safetensors`` file), ``"directory"`` (a model directory with one
    weights file) or ``"sharded"`` (shards listed by an index JSON).
    """

    path: Path
    """The argument as given."""
    layout: str
    files: tuple[Path, ...]
    """The tensor files, in the order the index lists them (one file unless sharded)."""
    weight_map: dict[str, Path]
    """Stored tensor name → the file holding it."""
    tensors: dict[str, TensorInfo]
    metadata: dict[Path, dict[str, str]]
    """Each file's safetensors metadata (``{"format": "pt"}`` for Hugging Face files)."""
    directory: Path | None = None
    """The model directory (side files such as ``config.json`` live there); None for a bare file."""
    index: dict | None = None
    """The parsed index JSON of a sharded checkpoint."""
    index_name: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    """Dropped names of tied tensors → the stored name (from this library's ``"aliases"`` metadata)."""

    @property
    def name(self) -> str:
        """A short name for messages: the directory or file name."""
        if self.layout == "sharded" and self.directory is not None:
            return self.directory.name
        return self.path.name


# ---------------------------------------------------------------------------------------------- resolving


def resolve_checkpoint(path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Find the tensor files of a checkpoint argument and read their headers (no tensor data).

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.zeros(2, 3)}, f"{d}/a.safetensors", metadata={"format": "pt"})
    ...     checkpoint = resolve_checkpoint(f"{d}/a.safetensors")
    >>> checkpoint.layout, checkpoint.tensors["w"]
    ('file', TensorInfo(dtype='F32', shape=(2, 3)))

    Raises:
        CheckpointError: a missing path, a directory without safetensors weights, a pickle file, an
            index naming files outside its directory or tensors its shards do not hold, an unreadable
            file.
    """
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _resolve_directory(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    if path.name.endswith(".json"):
        return _resolve_index(path, path, directory=path.parent)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"checkpoint {path} is neither a model directory, a .safetensors file nor a safetensors "
            "index .json"
        )
    return _checkpoint(path, "file", [path], None, directory=None)


def _resolve_directory(path: Path) -> Checkpoint:
    # A single weights file wins over an index, as in transformers' own loading order.
    if (path / WEIGHTS_FILE).is_file():
        return _checkpoint(path, "directory", [path / WEIGHTS_FILE], None, directory=path)
    if (path / INDEX_FILE).is_file():
        return _resolve_index(path, path / INDEX_FILE, directory=path)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(path / pickles[0]))
    raise CheckpointError(
        f"checkpoint directory {path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}; "
        "pass a model directory written by save_pretrained, a .safetensors file or an index .json"
    )


def _pickle_message(path: Path) -> str:
    return (
        f"checkpoint {path} is a pickle file; only safetensors checkpoints are supported (loading a pickle "
        "runs arbitrary code). Save with save_pretrained(..., safe_serialization=True) or convert it with "
        "safetensors.torch.save_file in an environment you trust"
    )


def _resolve_index(argument: Path, index_path: Path, *, directory: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the safetensors index {index_path}: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} is not a safetensors index: it has no 'weight_map'")
    files: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        # The index is data from disk: it may only name plain files beside it, never paths elsewhere.
        if (
            not isinstance(file_name, str)
            or Path(file_name).name != file_name
            or file_name in ("", ".", "..")
            or not file_name.endswith(".safetensors")
        ):
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {file_name!r}, which is not a .safetensors "
                "file name in the index's own directory"
            )
        files.setdefault(file_name, directory / file_name)
    checkpoint = _checkpoint(argument, "sharded", list(files.values()), index, directory=directory)
    for name, file_name in weight_map.items():
        if checkpoint.weight_map.get(name) != directory / file_name:
            raise CheckpointError(f"{index_path} maps tensor {name!r} to {file_name}, which does not hold it")
    return checkpoint


def _checkpoint(
    argument: Path, layout: str, files: list[Path], index: dict | None, *, directory: Path | None
) -> Checkpoint:
    weight_map: dict[str, Path] = {}
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"checkpoint {argument}: tensor file {file} is missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata[file] = dict(handle.metadata() or {})
                for name in handle.keys():
                    if name in weight_map:
                        raise CheckpointError(
                            f"checkpoint {argument}: tensor {name!r} is stored twice "
                            f"({weight_map[name].name} and {file.name})"
                        )
                    piece = handle.get_slice(name)
                    weight_map[name] = file
                    tensors[name] = TensorInfo(piece.get_dtype(), tuple(piece.get_shape()))
        except CheckpointError:
            raise
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise CheckpointError(f"cannot read {file} as safetensors: {error}") from None
    return Checkpoint(
        path=argument,
        layout=layout,
        files=tuple(files),
        weight_map=weight_map,
        tensors=tensors,
        metadata=metadata,
        directory=directory,
        index=index,
        index_name=None if index is None else _index_name(argument),
        aliases=_aliases(metadata, tensors),
    )


def _index_name(argument: Path) -> str:
    return INDEX_FILE if argument.is_dir() else argument.name


def _aliases(metadata: Mapping[Path, Mapping[str, str]], tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
    """The ``"aliases"`` this library's snapshot and export files record; anything else is ignored."""
    aliases: dict[str, str] = {}
    for values in metadata.values():
        try:
            found = json.loads(values.get("aliases", "{}"))
        except ValueError:
            continue
        if isinstance(found, dict):
            aliases.update(
                {k: v for k, v in found.items() if isinstance(k, str) and v in tensors and k not in tensors}
            )
    return aliases


# ---------------------------------------------------------------------------------------------- a series


def check_series(checkpoints: Sequence[Checkpoint]) -> None:
    """Check that every checkpoint stores the same tensor names, shapes and dtypes as the first.

    The error names the first differing tensor (in sorted order) and the two checkpoints.

    Raises:
        CheckpointError: an empty series or a mismatch.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints given")
    first = checkpoints[0]
    for other in checkpoints[1:]:
        for name in sorted(set(first.tensors) | set(other.tensors)):
            a, b = first.tensors.get(name), other.tensors.get(name)
            where = f"checkpoints {first.path} and {other.path}"
            if a is None or b is None:
                has, lacks = (first, other) if b is None else (other, first)
                raise CheckpointError(
                    f"tensor {name!r} is in checkpoint {has.path} but not in {lacks.path}; "
                    "a series must come from one model"
                )
            if a.shape != b.shape:
                raise CheckpointError(f"tensor {name!r} has shape {a.shape} vs {b.shape} in {where}")
            if a.dtype != b.dtype:
                raise CheckpointError(f"tensor {name!r} has dtype {a.dtype} vs {b.dtype} in {where}")


class _Readers:
    """Open safetensors handles, reused across tensors and closed together."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def get(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return handle

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._handles = {}

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(readers: _Readers, checkpoint: Checkpoint, name: str) -> torch.Tensor:
    return readers.get(checkpoint.weight_map[name]).get_tensor(name)


def _average_tensor(readers: _Readers, series: Sequence[Checkpoint], name: str) -> torch.Tensor:
    """The uniform mean of one tensor over the series, in its stored dtype.

    Summed in float64 in series order, divided once, then rounded to the stored dtype: float64 costs
    no model-sized memory here (one chunk of one tensor at a time) and makes the result the correctly
    rounded mean of float32/bf16 inputs for any practical series length, so it does not depend on how
    the series is split into files or chunks.
    """
    info = series[-1].tensors[name]
    if not info.is_floating:
        return _read(readers, series[-1], name)
    if not info.shape or info.shape[0] == 0 or _numel(info.shape) <= CHUNK_ELEMENTS:
        total = None
        for checkpoint in series:
            value = _read(readers, checkpoint, name)
            total = value.to(torch.float64, copy=True) if total is None else total.add_(value)
        return total.div_(len(series)).to(value.dtype)
    rows = info.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, _numel(info.shape[1:])))
    out = None
    for start in range(0, rows, step):
        total = None
        for checkpoint in series:
            piece = readers.get(checkpoint.weight_map[name]).get_slice(name)[start : start + step]
            total = piece.to(torch.float64, copy=True) if total is None else total.add_(piece)
        if out is None:
            out = torch.empty(info.shape, dtype=piece.dtype)
        out[start : start + step] = total.div_(len(series)).to(piece.dtype)
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def iter_average(
    checkpoints: Sequence[str | os.PathLike | Checkpoint], names: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, uniform mean over the checkpoints)`` one tensor at a time, in the stored dtype.

    Floating-point tensors are averaged; the others come from the last checkpoint. ``names``: which
    stored tensors, in which order (default: all, file by file of the last checkpoint).

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, f"{d}/a.safetensors")
    ...     save_file({"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(2)}, f"{d}/b.safetensors")
    ...     dict(iter_average([f"{d}/a.safetensors", f"{d}/b.safetensors"]))
    {'n': tensor(2), 'w': tensor([2., 4.])}

    Raises:
        CheckpointError: checkpoints that cannot be read or do not fit together.
    """
    series = [resolve_checkpoint(c) for c in checkpoints]
    check_series(series)
    if names is None:
        names = _names_by_file(series[-1])
    with _Readers() as readers:
        for name in names:
            yield name, _average_tensor(readers, series, name)


def _names_by_file(checkpoint: Checkpoint) -> list[str]:
    return [name for file in checkpoint.files for name in sorted(_stored_in(checkpoint, file))]


def _stored_in(checkpoint: Checkpoint, file: Path) -> list[str]:
    return [name for name, where in checkpoint.weight_map.items() if where == file]


def load_state(path: str | os.PathLike | Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of one checkpoint (all shards), by name; tied names this library recorded restored.

    Reads safetensors only (never pickle). Names a ``save_pretrained`` dropped as tied duplicates stay
    absent, as in the file: a model built from its config re-ties them.

    Raises:
        CheckpointError: as :func:`resolve_checkpoint`.
    """
    checkpoint = resolve_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    for alias, canonical in checkpoint.aliases.items():
        tensors[alias] = tensors[canonical]
    return tensors


# ---------------------------------------------------------------------------------------------- writing


def average_checkpoints(
    checkpoints: Sequence[str | os.PathLike | Checkpoint],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the uniform average of saved checkpoints to ``output``, in the last checkpoint's format.

    Floating-point tensors are averaged (float64 sums, rounded back to the stored dtype); the others
    are taken from the last checkpoint. The output has the format of the last checkpoint:

    * a bare ``.safetensors`` file → the file ``output``;
    * a model directory → the directory ``output`` with ``model.safetensors`` and the side files
      (``config.json``, ``generation_config.json``, tokenizer files) of the last checkpoint;
    * a sharded checkpoint → the directory ``output`` with the same shard files, each holding the same
      tensors, and an index with the same name and weight map (plus the side files found beside it).

    Each file keeps its safetensors metadata (``{"format": "pt"}`` is added if missing, since
    transformers refuses files without it). Tensors are read one at a time from all the checkpoints
    and each output file is written as soon as its tensors are averaged, so the peak memory is about
    one output file (one model, or one shard) plus one tensor's float64 sum, whatever the number of
    checkpoints. The output appears only once complete (written under a temporary name, then renamed).

    ``overwrite``: replace an existing ``output``. ``progress``: a tqdm bar over the tensors on stderr.

    >>> import tempfile, torch
    >>> from safetensors.torch import load_file, save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.tensor([1.0, 2.0])}, f"{d}/a.safetensors")
    ...     save_file({"w": torch.tensor([3.0, 7.0])}, f"{d}/b.safetensors")
    ...     out = average_checkpoints([f"{d}/a.safetensors", f"{d}/b.safetensors"], f"{d}/avg.safetensors")
    ...     load_file(out)
    {'w': tensor([2.0000, 4.5000])}

    Raises:
        CheckpointError: unreadable or mismatched checkpoints (the message names the tensor), an
            existing ``output`` without ``overwrite``, or an ``output`` that is one of the inputs.
    """
    series = [resolve_checkpoint(c) for c in checkpoints]
    check_series(series)
    output = Path(output)
    _check_output(output, series, overwrite)
    last = series[-1]
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    _remove(partial)
    bar = _bar(len(last.tensors), progress)
    try:
        with _Readers() as readers:
            if last.layout == "file":
                _write_file(readers, series, list(last.tensors), last.metadata[last.files[0]], partial, bar)
            else:
                _write_directory(readers, series, partial, bar)
        _publish(partial, output)
    except BaseException:
        _remove(partial)
        raise
    finally:
        bar.close()
    return output


def _write_directory(readers: _Readers, series: Sequence[Checkpoint], partial: Path, bar) -> None:
    last = series[-1]
    partial.mkdir()
    for file in last.files:
        names = sorted(_stored_in(last, file))
        _write_file(readers, series, names, last.metadata[file], partial / file.name, bar)
        # Handles of finished shards are dropped so that only the current shards stay mapped.
        readers.close()
    if last.index is not None:
        index = dict(last.index)
        index["weight_map"] = {name: last.weight_map[name].name for name in sorted(last.weight_map)}
        (partial / last.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        source = last.directory / name
        if source.is_file():
            shutil.copyfile(source, partial / name)


def _write_file(
    readers: _Readers,
    series: Sequence[Checkpoint],
    names: Sequence[str],
    metadata: Mapping[str, str],
    path: Path,
    bar,
) -> None:
    tensors = {}
    for name in names:
        tensors[name] = _average_tensor(readers, series, name)
        bar.update(1)
    metadata = {"format": "pt", **metadata}
    # Recent safetensors (0.8 here) writes straight from the tensors' memory; older ones serialise a
    # copy first, which doubles the peak for the file being written.
    save_file(tensors, str(path), metadata=metadata)


def _check_output(output: Path, series: Sequence[Checkpoint], overwrite: bool) -> None:
    resolved = output.resolve()
    for checkpoint in series:
        inputs = {checkpoint.path.resolve(), *(file.resolve() for file in checkpoint.files)}
        if checkpoint.directory is not None:
            inputs.add(checkpoint.directory.resolve())
        if resolved in inputs:
            raise CheckpointError(f"output {output} is one of the input checkpoints; choose another path")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise CheckpointError(f"output {output} already exists; remove it or pass --overwrite")
        if series[-1].layout == "file" and output.is_dir():
            raise CheckpointError(f"output {output} is a directory, but the average of files is one file")
    if series[-1].layout == "file" and output.suffix != ".safetensors":
        raise CheckpointError(f"output {output} must end in .safetensors: the inputs are .safetensors files")


def _publish(partial: Path, output: Path) -> None:
    if partial.is_file() or not (output.exists() or output.is_symlink()):
        os.replace(partial, output)
        return
    # A directory cannot atomically replace another one: swap through a second name.
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.replace(output, old)
    os.replace(partial, output)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="averaging", unit="tensor", file=sys.stderr, disable=not enabled)


# ---------------------------------------------------------------------------------------------- a model


class ModelLoader:
    """Load checkpoints, or their averages, into one model in place, one tensor at a time.

    Built once for a model and a checkpoint layout: it maps every stored tensor name to the model's
    state-dict tensors it fills (a tied group of parameters is one tensor under several names, filled
    from whichever name the checkpoint stores), and checks names and shapes up front, so a mismatch
    fails before any weight changes.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> model = torch.nn.Linear(2, 1)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, f"{d}/a.safetensors")
    ...     save_file({"weight": torch.zeros(1, 2), "bias": torch.ones(1)}, f"{d}/b.safetensors")
    ...     loader = ModelLoader(model, f"{d}/a.safetensors")
    ...     loader.load_average([f"{d}/a.safetensors", f"{d}/b.safetensors"])
    >>> model.weight.tolist(), model.bias.tolist()
    ([[0.5, 0.5]], [0.5])

    Raises:
        CheckpointError: a checkpoint tensor the model does not have, a model tensor the checkpoint
            lacks, or a shape that differs (the message names the tensor).
    """

    def __init__(self, model: torch.nn.Module, checkpoint: str | os.PathLike | Checkpoint):
        from checkpoint_stability.state import live_tensors

        self.reference = resolve_checkpoint(checkpoint)
        live = live_tensors(model)
        aliases = tied_groups(live)
        groups: dict[str, list[str]] = {}
        for name in live:
            groups.setdefault(aliases.get(name, name), []).append(name)
        stored_as = dict(self.reference.aliases)  # dropped name -> stored name
        source_of = {name: name for name in self.reference.tensors} | stored_as
        self._targets: dict[str, list[torch.Tensor]] = {}
        for canonical, names in groups.items():
            sources = [source_of[n] for n in names if n in source_of]
            if not sources:
                raise CheckpointError(
                    f"the model's tensor {names[0]!r} is missing from checkpoint {self.reference.path}"
                )
            source = sources[0]
            info, target = self.reference.tensors[source], live[canonical]
            if tuple(target.shape) != info.shape:
                raise CheckpointError(
                    f"tensor {source!r} has shape {info.shape} in checkpoint {self.reference.path} but "
                    f"{tuple(target.shape)} in the model"
                )
            self._targets.setdefault(source, []).append(target)
        # A stored name the model lacks means another model; one that is a second stored copy of a tied
        # group (saved untied, loaded tied) is simply not needed.
        unexpected = sorted(set(self.reference.tensors) - set(live))
        if unexpected:
            raise CheckpointError(
                f"checkpoint {self.reference.path} has tensor {unexpected[0]!r}, which the model does not "
                f"have ({len(unexpected)} such tensors)"
            )

    @torch.no_grad()
    def load(self, checkpoint: str | os.PathLike | Checkpoint) -> None:
        """Copy one checkpoint's tensors into the model (cast to the model's dtypes)."""
        checkpoint = resolve_checkpoint(checkpoint)
        check_series([self.reference, checkpoint])
        with _Readers() as readers:
            for name, targets in self._targets.items():
                value = _read(readers, checkpoint, name)
                for target in targets:
                    target.copy_(value)

    @torch.no_grad()
    def load_average(self, checkpoints: Sequence[str | os.PathLike | Checkpoint]) -> None:
        """Copy the uniform average of ``checkpoints`` into the model, as :func:`average_checkpoints`
        would write it (rounded to the stored dtype, then cast to the model's)."""
        series = [resolve_checkpoint(c) for c in checkpoints]
        check_series([self.reference, *series])
        for name, value in iter_average(series, names=list(self._targets)):
            for target in self._targets[name]:
                target.copy_(value)
