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

Writing an average never harms what it reads or what it replaces: an output that contains, is, or
lies inside an input checkpoint is refused; ``overwrite`` replaces only a previous average (one that
carries this module's marker: a ``checkpoint-stability-average.json`` file in an output directory, a
``checkpoint_stability_average`` metadata key in an output file); the new output is written beside the
old one and swapped in with one rename. Side files are copied only when they are regular files inside
the checkpoint directory, or links into the blobs of the Hugging Face cache repository the checkpoint
is a snapshot of; anything else is skipped with a warning naming it and where it points.

Tied weights: ``save_pretrained`` and ``safetensors.torch.save_model`` store a tensor shared under
several names once, under one of them; a model re-ties the others when it is built. So averaging
handles the stored names only (the output drops the same duplicates as its inputs), and loading into a
model fills a tied group of parameters from whichever of its names the file stores. Snapshots and
exports written by this library record the dropped names in their ``"aliases"`` metadata; those count
as stored too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.exact_sums import exact_sum, row_blocks
from checkpoint_stability.state_dicts import tied_groups
from checkpoint_stability.storage.atomic_files import fsync_directory, fsync_tree
from checkpoint_stability.storage.confinement import file_kind, is_inside, open_confined, writable_file
from checkpoint_stability.storage.json_files import DamagedJSONError, parse_json_object, read_json_object

logger = logging.getLogger(__name__)

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
# What marks an output as a previous average, which ``overwrite`` may replace: a JSON file in an output
# directory, a metadata key in an output .safetensors file. Both hold {"written_by", "version", "inputs"}.
MARKER_FILE = "checkpoint-stability-average.json"
MARKER_KEY = "checkpoint_stability_average"
WRITTEN_BY = "checkpoint-stability average"
# Floating and complex safetensors dtypes torch can load and compute with; the others (F4, packed two to
# a byte with no arithmetic; F6_*, which safetensors cannot load into torch) are refused by name.
AVERAGED_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}
)
# Rows of a tensor averaged at once: bounds the float64 accumulator to 64 MiB whatever the tensor size.
CHUNK_ELEMENTS = 8 * 1024 * 1024


class CheckpointError(CheckpointStabilityError, ValueError):
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

    @property
    def is_complex(self) -> bool:
        """Complex tensors are averaged too (in complex128)."""
        return self.dtype.startswith("C")

    @property
    def is_averaged(self) -> bool:
        """Averaged (floating or complex) rather than taken from the newest checkpoint."""
        return self.is_floating or self.is_complex


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
        index = read_json_object(index_path, f"the safetensors index {index_path}")
    except FileNotFoundError:
        raise CheckpointError(f"cannot read the safetensors index {index_path}: it does not exist") from None
    except DamagedJSONError as error:
        raise CheckpointError(str(error)) from None
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
    """The ``"aliases"`` this library's snapshot and export files record: a JSON object of dropped name →
    stored name; entries naming no stored tensor are ignored. An ``"aliases"`` value that is not a JSON
    object (malformed, nested too deeply, a list) is a :class:`CheckpointError` naming the file."""
    aliases: dict[str, str] = {}
    for file, values in metadata.items():
        if "aliases" not in values:
            continue
        try:
            found = parse_json_object(values["aliases"], f"the 'aliases' metadata of {file}")
        except DamagedJSONError as error:
            raise CheckpointError(str(error)) from None
        aliases.update(
            {k: v for k, v in found.items() if isinstance(v, str) and v in tensors and k not in tensors}
        )
    return aliases


# ---------------------------------------------------------------------------------------------- a series


def check_series(checkpoints: Sequence[Checkpoint]) -> None:
    """Check that every checkpoint stores the same tensor names, shapes and dtypes as the first, and
    that torch can compute with every floating dtype among them.

    The error names the first differing tensor (in sorted order) and the two checkpoints.

    Raises:
        CheckpointError: an empty series, a mismatch, or a dtype that cannot be averaged (``F4``,
            ``F6_E2M3``, ``F6_E3M2``).
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints given")
    first = checkpoints[0]
    for name in sorted(first.tensors):
        info = first.tensors[name]
        if info.is_averaged and info.dtype not in AVERAGED_DTYPES:
            why = (
                "safetensors cannot load it into torch"
                if info.dtype.startswith("F6")
                else "torch has no arithmetic for it"
            )
            raise CheckpointError(
                f"tensor {name!r} of checkpoint {first.path} has dtype {info.dtype}, which cannot be "
                f"averaged or loaded ({why}); convert the checkpoints to BF16, F16 or F32 first"
            )
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


def _average_tensor(
    readers: _Readers, series: Sequence[Checkpoint], name: str, nan: dict[str, None] | None = None
) -> torch.Tensor:
    """The uniform mean of one tensor over the series, in its stored dtype.

    Summed in float64 (complex128 for complex tensors) in series order by ``exact_sums.exact_sum``, the
    summation the live window average re-sums with, divided once, then rounded to the stored dtype:
    float64 costs no model-sized memory here (one chunk of one tensor at a time) and makes the result
    the correctly rounded mean of float32/bf16/float8 inputs for any practical series length, so it
    does not depend on how the series is split into files or chunks. Only the reading differs from
    the live re-sum, on purpose: that one opens a snapshot file afresh for every piece, since it runs
    beside training for the whole run (benchmarks/RESULTS.md, item 7); this one-off command reads
    through ``readers``, whose handles stay open for the current output file only (``_write_directory``
    drops them after each shard).

    ``nan``: when given, ``name`` is added to it if the mean holds a NaN.
    """
    info = series[-1].tensors[name]
    if not info.is_averaged:
        return _read(readers, series[-1], name)
    if not info.shape or info.shape[0] == 0 or math.prod(info.shape) <= CHUNK_ELEMENTS:
        summed = exact_sum(_read(readers, checkpoint, name) for checkpoint in series)
        _note_nan(summed.total, name, nan)
        return summed.total.div_(summed.n).to(summed.dtype)
    out = None
    for start, end in row_blocks(info.shape, CHUNK_ELEMENTS):
        summed = exact_sum(_read_rows(readers, checkpoint, name, start, end) for checkpoint in series)
        _note_nan(summed.total, name, nan)
        if out is None:
            out = torch.empty(info.shape, dtype=summed.dtype)
        out[start:end] = summed.total.div_(summed.n).to(summed.dtype)
    if out is None:  # a tensor with rows always yields at least one block
        raise CheckpointError(f"{name}: no rows to average")
    return out


def _read_rows(readers: _Readers, checkpoint: Checkpoint, name: str, start: int, end: int) -> torch.Tensor:
    return readers.get(checkpoint.weight_map[name]).get_slice(name)[start:end]


def _note_nan(total: torch.Tensor, name: str, nan: dict[str, None] | None) -> None:
    if nan is not None and name not in nan and bool(torch.isnan(total).any()):
        nan[name] = None


def iter_average(
    checkpoints: Sequence[str | os.PathLike | Checkpoint], names: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, uniform mean over the checkpoints)`` one tensor at a time, in the stored dtype.

    Floating-point (float8 to float64) and complex tensors are averaged; the others come from the last
    checkpoint. ``names``: which
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


class AverageWriteError(CheckpointStabilityError, OSError):
    """The average could not be written (a full disk, say): nothing was published, and the inputs and
    any previous output are unchanged. Its message names the output and the reason."""

    def __str__(self) -> str:
        return str(self.strerror)


def average_checkpoints(
    checkpoints: Sequence[str | os.PathLike | Checkpoint],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the uniform average of saved checkpoints to ``output``, in the last checkpoint's format.

    Floating-point tensors (float8 to float64) and complex ones are averaged (float64 or complex128
    sums, rounded back to the stored dtype); the others are taken from the last checkpoint. The output
    has the format of the last checkpoint:

    * a bare ``.safetensors`` file → the file ``output``;
    * a model directory → the directory ``output`` with ``model.safetensors`` and the side files
      (``config.json``, ``generation_config.json``, tokenizer files) of the last checkpoint;
    * a sharded checkpoint → the directory ``output`` with the same shard files, each holding the same
      tensors, and an index with the same name and weight map (plus the side files found beside it).

    Each file keeps its safetensors metadata (``{"format": "pt"}`` is added if missing, since
    transformers refuses files without it). An output directory also holds
    ``checkpoint-stability-average.json`` (``written_by``, ``version``, ``inputs``); an output file carries
    the same JSON under the metadata key ``checkpoint_stability_average``. Tensors are read one at a
    time from all the checkpoints and each output file is written as soon as its tensors are averaged,
    so the peak memory is about one output file (one model, or one shard) plus one tensor's float64 sum,
    whatever the number of checkpoints. Every output file gets the same mode (0o644 under the process umask).

    The output is written in a staging sibling (``.<name>.partial-<pid>``), fsynced, then renamed into
    place; a previous average stays whole until that rename (on Linux, directories are swapped in one
    ``renameat2(RENAME_EXCHANGE)``). On any failure the staging copy is removed and nothing else changes.

    Side files are copied only when they are regular files inside the checkpoint directory, or links into
    the ``blobs`` of the Hugging Face cache repository (``models--org--name``) the checkpoint directory
    is a snapshot of; others (a link to ``~/.ssh/id_rsa``, a FIFO) are skipped with a warning naming the
    file and where it points. A NaN in an average is written as is, with a warning naming the tensors and
    the input checkpoints holding NaN.

    ``overwrite``: replace an existing ``output`` that holds a previous average (it has the marker above);
    anything else is refused. ``progress``: a tqdm bar over the tensors on stderr.

    >>> import tempfile, torch
    >>> from safetensors.torch import load_file, save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.tensor([1.0, 2.0])}, f"{d}/a.safetensors")
    ...     save_file({"w": torch.tensor([3.0, 7.0])}, f"{d}/b.safetensors")
    ...     out = average_checkpoints([f"{d}/a.safetensors", f"{d}/b.safetensors"], f"{d}/avg.safetensors")
    ...     load_file(out)
    {'w': tensor([2.0000, 4.5000])}

    Raises:
        CheckpointError: unreadable or mismatched checkpoints (the message names the tensor), a dtype
            torch cannot average (``F4``, ``F6_*``), an existing ``output`` without ``overwrite`` or that
            is not a previous average, an ``output`` that is, contains or lies inside an input.
        AverageWriteError: (an ``OSError``) the output could not be written, e.g. a full disk.
    """
    series = [resolve_checkpoint(c) for c in checkpoints]
    check_series(series)
    given = Path(output)
    output = Path(os.path.abspath(given))
    single_file = series[-1].layout == "file"
    _check_output(given, output, series, overwrite)
    replacing = os.path.lexists(output)
    marker = {
        "written_by": WRITTEN_BY,
        "version": _version(),
        "inputs": [os.path.abspath(c.path) for c in series],
    }
    bar = _bar(len(series[-1].tensors), progress)
    nan: dict[str, None] = {}
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        with _writing(given):
            output.parent.mkdir(parents=True, exist_ok=True)
            _remove(staging)  # left by a crash of an earlier process with this pid
            staging.mkdir()
        try:
            # One mode for every output file: 0o644, narrowed by the umask the directory was made under.
            file_mode = 0o644 & stat.S_IMODE(os.stat(staging).st_mode)
            with _Readers() as readers:
                if single_file:
                    metadata = {**series[-1].metadata[series[-1].files[0]], MARKER_KEY: json.dumps(marker)}
                    target = staging / output.name
                    names = list(series[-1].tensors)
                    _write_file(readers, series, names, metadata, staging, target, file_mode, bar, nan, given)
                else:
                    _write_directory(readers, series, staging, file_mode, bar, nan, marker, given)
            with _writing(given):
                fsync_tree(staging)
                _publish(staging, output, single_file)
        except BaseException:
            _remove(staging)
            raise
    except AverageWriteError as error:
        kept = "the previous average is unchanged" if replacing else "nothing was written"
        raise AverageWriteError(error.errno, f"{error.strerror}; {kept}") from None
    finally:
        bar.close()
    if nan:
        _warn_nan(series, list(nan))
    return given


def _version() -> str:
    from checkpoint_stability._version import __version__

    return __version__


@contextlib.contextmanager
def _writing(output: Path) -> Iterator[None]:
    """Turn a failed write (``OSError``, or safetensors' own error for an I/O failure) into one
    :class:`AverageWriteError` naming the output."""
    try:
        yield
    except AverageWriteError:
        raise
    except (OSError, SafetensorError) as error:
        if isinstance(error, OSError):
            code, reason = error.errno, error.strerror or str(error)
        else:
            found = re.search(r"\(os error (\d+)\)", str(error))
            if found is None and "I/O error" not in str(error):
                raise
            code = int(found.group(1)) if found else errno.EIO
            reason = os.strerror(code) if found else str(error)
        raise AverageWriteError(code, f"cannot write the average {output}: {reason}") from None


def _write_directory(
    readers: _Readers,
    series: Sequence[Checkpoint],
    staging: Path,
    file_mode: int,
    bar,
    nan: dict[str, None],
    marker: dict,
    output: Path,
) -> None:
    last = series[-1]
    for file in last.files:
        names = sorted(_stored_in(last, file))
        _write_file(
            readers,
            series,
            names,
            last.metadata[file],
            staging,
            staging / file.name,
            file_mode,
            bar,
            nan,
            output,
        )
        # Handles of finished shards are dropped so that only the current shards stay mapped.
        readers.close()
    if last.index is not None and last.index_name is not None:
        index = dict(last.index)
        index["weight_map"] = {name: last.weight_map[name].name for name in sorted(last.weight_map)}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        with _writing(output):
            _write_new(staging, staging / last.index_name, text.encode(), file_mode)
    if last.directory is not None:
        _copy_side_files(last.directory, staging, file_mode, output)
    with _writing(output):
        _write_new(staging, staging / MARKER_FILE, (json.dumps(marker, indent=2) + "\n").encode(), file_mode)


def _write_file(
    readers: _Readers,
    series: Sequence[Checkpoint],
    names: Sequence[str],
    metadata: Mapping[str, str],
    staging: Path,
    path: Path,
    file_mode: int,
    bar,
    nan: dict[str, None],
    output: Path,
) -> None:
    tensors = {}
    for name in names:
        tensors[name] = _average_tensor(readers, series, name, nan)
        bar.update(1)
    metadata = {"format": "pt", **metadata}
    writable_file(staging, path)
    # Recent safetensors (0.8 here) writes straight from the tensors' memory; older ones serialise a
    # copy first, which doubles the peak for the file being written.
    with _writing(output):
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, file_mode)


def _write_new(staging: Path, path: Path, data: bytes, file_mode: int) -> None:
    fd = open_confined(staging, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
    with open(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), file_mode)


# ---------------------------------------------------------------------------------------------- side files


def _copy_side_files(directory: Path, staging: Path, file_mode: int, output: Path) -> None:
    blobs = _hub_blobs(directory)
    for name in SIDE_FILES:
        source = directory / name
        if not os.path.lexists(source) or os.path.lexists(staging / name):
            continue
        opened = _open_side_file(source, directory, blobs)
        if isinstance(opened, str):
            logger.warning("not copying %s: %s; the average is written without it", source, opened)
            continue
        with open(opened, "rb") as src, _writing(output):
            fd = open_confined(staging, staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
            with open(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                os.fchmod(dst.fileno(), file_mode)


def _hub_blobs(directory: Path) -> Path | None:
    """``.../models--org--name/blobs`` when ``directory`` is a snapshot of a Hugging Face hub cache
    (``.../models--org--name/snapshots/<revision>``), whose files are links into those blobs."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent / "blobs"
    return None


def _open_side_file(source: Path, directory: Path, blobs: Path | None) -> int | str:
    """A read descriptor of a side file fit to copy, or why it is not: it must be a regular file whose
    real path is inside the checkpoint directory or inside its hub cache repository's blobs."""
    real = os.path.realpath(source)
    pointing = f"it is a symlink to {real}" if source.is_symlink() else f"it resolves to {real}"
    if not (is_inside(real, directory) or (blobs is not None and is_inside(real, blobs))):
        where = f"outside the checkpoint directory {directory}"
        if blobs is not None:
            where += f" and outside its Hugging Face cache blobs {blobs}"
        return f"{pointing}, {where}"
    try:
        # O_NOFOLLOW: the real path was checked, a link swapped in since is not followed; O_NONBLOCK: a
        # FIFO would otherwise block the open forever.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if not os.path.lexists(real):
            return f"{pointing}, which does not exist"
        return f"it cannot be read ({error.strerror or error})"
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        return f"it is {file_kind(mode)}, not a regular file"
    os.set_blocking(fd, True)
    return fd


# ---------------------------------------------------------------------------------------------- the output


def _check_output(given: Path, output: Path, series: Sequence[Checkpoint], overwrite: bool) -> None:
    if not output.name:
        raise CheckpointError(f"output {given} names no file or directory; choose another path")
    for checkpoint in series:
        places = [checkpoint.path, *checkpoint.files]
        if checkpoint.directory is not None:
            places.append(checkpoint.directory)
        if any(os.path.realpath(place) == os.path.realpath(output) for place in places):
            raise CheckpointError(
                f"output {given} is one of the input checkpoints ({checkpoint.path}); choose another path"
            )
        if any(is_inside(place, output) for place in places):
            raise CheckpointError(
                f"output {given} contains the input checkpoint {checkpoint.path}; writing the average there "
                "would replace it: choose a new path"
            )
        if checkpoint.directory is not None and is_inside(output, checkpoint.directory):
            raise CheckpointError(
                f"output {given} is inside the input checkpoint {checkpoint.path}; choose a path outside "
                "the inputs"
            )
    single_file = series[-1].layout == "file"
    if os.path.lexists(output):
        if not overwrite:
            raise CheckpointError(f"output {given} already exists; remove it or pass --overwrite")
        if output.is_symlink():
            raise CheckpointError(
                f"output {given} is a symlink (to {os.readlink(output)}); --overwrite replaces only a "
                "previous average written there, not a link: remove it or choose another path"
            )
        if single_file and output.is_dir():
            raise CheckpointError(f"output {given} is a directory, but the average of files is one file")
        if not single_file and not output.is_dir():
            raise CheckpointError(
                f"output {given} is a file, but the average of model directories is a directory; remove it "
                "or choose another path"
            )
        if single_file and not _is_average_file(output):
            raise CheckpointError(
                f"output {given} is not an average written by checkpoint-stability (its metadata has no "
                f"{MARKER_KEY!r}); --overwrite only replaces a previous average: remove it yourself or "
                "choose another path"
            )
        if not single_file and not _is_average_directory(output):
            raise CheckpointError(
                f"output {given} is not an average written by checkpoint-stability (it has no "
                f"{MARKER_FILE}); --overwrite only replaces a previous average: remove it yourself or choose "
                "another path"
            )
    if single_file and output.suffix != ".safetensors":
        raise CheckpointError(f"output {given} must end in .safetensors: the inputs are .safetensors files")


def _is_marker(value: dict) -> bool:
    return value.get("written_by") == WRITTEN_BY


def _is_average_directory(path: Path) -> bool:
    marker = path / MARKER_FILE
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        return _is_marker(read_json_object(marker))
    except (OSError, ValueError):
        return False


def _is_average_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get(MARKER_KEY)
        return isinstance(value, str) and _is_marker(parse_json_object(value, MARKER_KEY))
    except Exception:  # not safetensors at all, a damaged header, a damaged marker
        return False


def _publish(staging: Path, output: Path, single_file: bool) -> None:
    """Move the finished average from ``staging`` to ``output``, replacing a previous one in one rename."""
    if single_file:
        os.replace(staging / output.name, output)
        _remove(staging)
    elif not os.path.lexists(output):
        os.rename(staging, output)
    elif _exchange(staging, output):
        _remove(staging)  # now the previous average
    else:
        # No atomic exchange here: swap through a second name, putting the old output back on failure.
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(output, old)
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(old, output)
            raise
        _remove(old)
    fsync_directory(output.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------- NaN


def _warn_nan(series: Sequence[Checkpoint], names: Sequence[str]) -> None:
    shown = []
    for name in names[:5]:
        holders = [str(c.path) for c in series if _holds_nan(c, name)]
        source = f"NaN in {', '.join(holders)}" if holders else "infinities of opposite signs"
        shown.append(f"{name!r} ({source})")
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    logger.warning(
        "the average holds NaN in %d tensor(s): %s%s; it was written as is: check those checkpoints",
        len(names),
        ", ".join(shown),
        more,
    )


def _holds_nan(checkpoint: Checkpoint, name: str) -> bool:
    info = checkpoint.tensors[name]
    with safe_open(str(checkpoint.weight_map[name]), framework="pt") as handle:
        if not info.shape or info.shape[0] == 0 or math.prod(info.shape) <= CHUNK_ELEMENTS:
            return bool(torch.isnan(handle.get_tensor(name)).any())
        piece = handle.get_slice(name)
        return any(bool(torch.isnan(piece[s:e]).any()) for s, e in row_blocks(info.shape, CHUNK_ELEMENTS))


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
        from checkpoint_stability.state_dicts import live_tensors

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
