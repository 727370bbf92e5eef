"""SnapshotBuffer: the rolling on-disk window of the newest snapshots (safetensors + manifest.json)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.state_dicts import (
    CapturedState,
    PinnedStaging,
    capture_state,
    check_dense,
    stored_dtype,
    tied_groups,
)
from checkpoint_stability.storage.atomic_files import WRITE_CHUNK, atomic_write_bytes
from checkpoint_stability.storage.checksums import ALGORITHMS, DEFAULT_ALGORITHM, Checksum
from checkpoint_stability.storage.json_files import DamagedJSONError, read_json_object
from checkpoint_stability.validation import require_int

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_SNAPSHOT_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")
_TEMPORARY_NAME = re.compile(r"^\..+\.tmp-\d+$")
_HASH_CHUNK = 8 << 20
# An evicted snapshot is read back this many bytes at a time, as files are written: a chunk is still in
# the CPU's cache when the checksum that reads it first hands it on to the subtraction. A multiple of 8
# bytes, so that no element of any dtype straddles two chunks.
_IO_CHUNK = WRITE_CHUNK
_MAX_DROPPED_LISTED = 10_000


# safetensors' names for the dtypes a state dict holds; anything else goes through safetensors' own save.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# Tensors of up to this many bytes are copied into a snapshot image by one single-threaded memcpy
# (numpy's), larger ones by torch's ``copy_``, which splits a tensor above 32K elements across the
# intra-op threads. Waking those threads costs more than copying a small tensor. Measured on 2 cores
# (benchmarks/RESULTS.md, item 10), numpy's copy ÷ torch's when idle threads sleep / spin: 128 KiB
# 0.59 / 0.51, 1 MiB 0.58 / 1.00, 4 MiB 0.76 / 1.51. At the bound neither loses.
_MEMCPY_MAX_BYTES = 1 << 20
# numpy has no bfloat16: such a tensor is copied as the 16-bit integers of the same bytes.
_NUMPY_STAND_INS = {torch.bfloat16: torch.int16}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _layout(specs: Sequence[tuple[str, torch.dtype, tuple]]) -> tuple[list[str], dict[str, list]]:
    """Data order and header entries of a safetensors file: largest items first, so that every tensor
    sits at an offset aligned to its item size (as safetensors lays it out)."""
    order = sorted(range(len(specs)), key=lambda k: (-specs[k][1].itemsize, specs[k][0]))
    entries: dict[str, list] = {}
    offset = 0
    for k in order:
        name, dtype, shape = specs[k]
        size = math.prod(shape) * dtype.itemsize
        entries[name] = [_SAFETENSORS_DTYPES[dtype], list(shape), [offset, offset + size]]
        offset += size
    return [specs[k][0] for k in order], entries


def _header(entries: dict[str, list], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for name, (dtype, shape, offsets) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return json.dumps(header, separators=(",", ":")).encode()


def _write_header(image: memoryview, encoded: bytes, capacity: int) -> None:
    """The 8-byte little-endian header length and the JSON header, padded with spaces (valid JSON
    whitespace, as safetensors pads) to ``capacity`` bytes. Plain byte copies: through torch, the two
    small copies of every snapshot cost more than the header's encoding."""
    image[:8] = capacity.to_bytes(8, "little")
    image[8 : 8 + len(encoded)] = encoded
    image[8 + len(encoded) : 8 + capacity] = b" " * (capacity - len(encoded))


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> memoryview:
    """The bytes of a safetensors file holding ``tensors`` (CPU tensors), built in one buffer.

    ``safetensors.torch.save`` goes through a Python ``bytes`` per tensor and then joins them, several
    times slower than ``save_file`` on large models (benchmarks/RESULTS.md, item 6). Here each tensor is
    copied once, by torch, into a preallocated buffer laid out as the format says. Files are read back only
    with safetensors' own readers.
    """
    if any(t.dtype not in _SAFETENSORS_DTYPES or t.device.type != "cpu" for t in tensors.values()):
        return memoryview(safetensors_save(dict(tensors), metadata=dict(metadata)))
    order, entries = _layout([(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()])
    encoded = _header(entries, metadata)
    capacity = len(encoded) + (-len(encoded) % 8)
    start = 8 + capacity
    image = torch.empty(start + sum(e[2][1] - e[2][0] for e in entries.values()), dtype=torch.uint8)
    data = memoryview(image.numpy())  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    _write_header(data, encoded, capacity)
    for name in order:
        begin, end = entries[name][2]
        if end > begin:
            image[start + begin : start + end].copy_(tensors[name].contiguous().reshape(-1).view(torch.uint8))
    return data


# Stands for the step in a cached header (``SnapshotImage._encoded_header``): JSON escapes the NUL
# characters, so the encoded placeholder cannot occur anywhere else in a header.
_STEP_PLACEHOLDER = "\x00step\x00"
_ENCODED_STEP_PLACEHOLDER = json.dumps(_STEP_PLACEHOLDER)[1:-1].encode()


class SnapshotImage:
    """The bytes of a snapshot's safetensors file, in memory, that a CPU snapshot is copied straight into.

    The copy on the training thread is then also the serialisation: the writer thread writes these bytes
    as they are. The image is allocated once and reused by every later snapshot of the same tensors:
    a fresh allocation of a model's size costs more in page faults than the copy itself
    (benchmarks/RESULTS.md, item 1, measures the push against a bare ``clone()``). The price is that one
    snapshot's worth of memory stays allocated between snapshots, and that a captured state is valid
    only until the next capture: ``SnapshotBuffer`` waits for the previous write before capturing again,
    and the window average copies what it keeps.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._image: torch.Tensor | None = None
        self._bytes: memoryview | None = None  # the image's bytes, as the writer thread writes them
        self._views: dict[str, torch.Tensor] = {}
        # numpy arrays over the views of small tensors (see _MEMCPY_MAX_BYTES)
        self._arrays: dict[str, np.ndarray] = {}
        self._entries: dict[str, list] = {}
        self._capacity = 0
        # (the metadata but the step, the header with a placeholder for the step)
        self._template: tuple[tuple, bytes] | None = None

    def capture(
        self,
        tensors: Mapping[str, torch.Tensor],
        storage_dtype: torch.dtype | None,
        metadata: Mapping[str, str],
    ) -> CapturedState | None:
        """Copy ``tensors`` into the image; None if they cannot live in one (not on CPU, unusual dtypes)."""
        aliases = tied_groups(tensors)
        distinct = {name: t for name, t in tensors.items() if name not in aliases}
        specs = []
        for name, tensor in distinct.items():
            check_dense(name, tensor)
            dtype = stored_dtype(tensor, storage_dtype) or tensor.dtype
            if tensor.device.type != "cpu" or dtype not in _SAFETENSORS_DTYPES:
                return None
            specs.append((name, dtype, tuple(tensor.shape)))
        metadata = {**metadata, "aliases": json.dumps(aliases)}
        key = tuple(specs)
        if key != self._key:
            self._allocate(key, metadata)
        encoded = self._encoded_header(metadata)
        if len(encoded) > self._capacity:
            self._allocate(key, metadata)
            encoded = self._encoded_header(metadata)
        data = self._bytes
        if data is None:  # _allocate always makes one; a failure there has raised
            return None
        _write_header(data, encoded, self._capacity)
        for name, tensor in distinct.items():
            view = self._views[name]
            array = self._arrays.get(name)
            # Plain tensors only: a subclass's numpy() need not be its data.
            if array is not None and tensor.dtype == view.dtype and type(tensor) in _PLAIN_TENSORS:
                source = tensor.detach() if tensor.requires_grad else tensor
                stand_in = _NUMPY_STAND_INS.get(source.dtype)
                np.copyto(array, (source if stand_in is None else source.view(stand_in)).numpy())
            else:
                view.copy_(tensor.detach())
        return CapturedState(
            {name: self._views[name] for name in distinct},
            aliases,
            file_image=data,
        )

    def _encoded_header(self, metadata: Mapping[str, str]) -> bytes:
        """The JSON header for ``metadata``. Snapshots of one model differ only in their step, so the
        header is encoded once per layout and the step put into a copy of it (encoding a few hundred
        tensors' entries at every snapshot was a visible part of a small model's pause)."""
        step = metadata.get("step")
        if step is None or not step.isdigit():
            return _header(self._entries, metadata)
        rest = tuple(sorted((k, v) for k, v in metadata.items() if k != "step"))
        if self._template is None or self._template[0] != rest:
            template = _header(self._entries, {**metadata, "step": _STEP_PLACEHOLDER})
            self._template = (rest, template)
        return self._template[1].replace(_ENCODED_STEP_PLACEHOLDER, step.encode(), 1)

    def release(self) -> None:
        """Drop the image (the next capture allocates a new one)."""
        self._template = None
        self._key = None
        self._image = None
        self._bytes = None
        self._views = {}
        self._arrays = {}
        self._entries = {}
        self._capacity = 0

    def _allocate(self, specs: tuple, metadata: Mapping[str, str]) -> None:
        self.release()
        _, self._entries = _layout(specs)
        # Room for the header to grow (longer step numbers, aliases) without moving the data.
        needed = len(_header(self._entries, metadata)) + 256
        self._capacity = needed + (-needed % 8)
        start = 8 + self._capacity
        data_bytes = sum(entry[2][1] - entry[2][0] for entry in self._entries.values())
        self._image = torch.empty(start + data_bytes, dtype=torch.uint8)
        self._bytes = memoryview(self._image.numpy())  # type: ignore[arg-type]  # the buffer protocol
        for name, dtype, shape in specs:
            begin, end = self._entries[name][2]
            view = self._views[name] = self._image[start + begin : start + end].view(dtype).view(shape)
            if end - begin <= _MEMCPY_MAX_BYTES:
                self._arrays[name] = view.view(_NUMPY_STAND_INS.get(dtype, dtype)).numpy()
        self._key = specs


def snapshot_file_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


class SnapshotError(CheckpointStabilityError, RuntimeError):
    """A snapshot could not be written or read back; ``step`` names it."""

    def __init__(self, step: int | None, message: str):
        super().__init__(message)
        self.step = step


class CorruptSnapshotError(SnapshotError):
    """A buffered file is missing, truncated, fails its checksum, or is not ours."""


@dataclass(frozen=True)
class SnapshotEntry:
    """One buffered snapshot as the manifest records it."""

    step: int
    file: str
    checksum: str
    """The file's checksum (hex digits) in ``algorithm``."""
    bytes: int
    time: float
    aliases: dict[str, str] = field(default_factory=dict)
    algorithm: str = DEFAULT_ALGORITHM
    """Which checksum (``storage.checksums.ALGORITHMS``): ``"blake3"``, or ``"sha256"`` in manifests
    written before. The manifest names it by its key: ``{"blake3": "<hex>", ...}``."""

    def to_json(self) -> dict:
        item = asdict(self)
        item[item.pop("algorithm")] = item.pop("checksum")
        return item

    @classmethod
    def from_json(cls, item: Mapping) -> SnapshotEntry:
        """An entry from a manifest item. Raises KeyError, TypeError or ValueError for a malformed one."""
        algorithm = next((name for name in ALGORITHMS if name in item), None)
        if algorithm is None:
            raise KeyError(f"no checksum (one of {', '.join(ALGORITHMS)})")
        return cls(
            step=int(item["step"]),
            file=str(item["file"]),
            checksum=str(item[algorithm]),
            bytes=int(item["bytes"]),
            time=float(item.get("time", 0.0)),
            aliases={str(k): str(v) for k, v in dict(item.get("aliases", {})).items()},
            algorithm=algorithm,
        )


# Called by the writer thread after a snapshot's file is durable and before the manifest commits it:
# (added snapshot, loaders of the evicted snapshots, loader of the whole new window). The window
# average hangs here, so an evicted file is deleted only after the average has subtracted it.
WindowListener = Callable[
    [CapturedState, Sequence[Callable[[], Mapping[str, torch.Tensor]]], Callable[[], list[Mapping]]], None
]


class SnapshotBuffer:
    """The last ``window`` snapshots of a model, on disk, crash-safe.

    Each snapshot is a safetensors file written to a temporary name, fsynced and renamed; then
    ``manifest.json`` (step, file name, checksum (BLAKE3), size, tied-tensor aliases of each snapshot) is
    rewritten the same way. The manifest is the truth: on open, files it does not name are removed,
    and entries whose file is missing, truncated, a symlink, not a plain ``step-*.safetensors`` name, or
    fails its checksum are dropped with one warning each.

    ``push`` copies the weights to CPU on the caller's thread (the only blocking part), straight into
    the bytes of the file to be written, and leaves the writing to one background thread. At most one
    write is in flight: the next ``push`` waits for it, so memory stays bounded: one snapshot's file
    image, kept allocated and reused from push to push. The background thread writes the file on an I/O
    thread (checksummed chunk by chunk as it goes) while the listener, the window average, takes the
    snapshot in; the file leaving the window is read once, front to back, and verified by that read
    (``StreamedSnapshot``).

    Example::

        >>> import tempfile, torch
        >>> from checkpoint_stability.buffer import SnapshotBuffer
        >>> model = torch.nn.Linear(4, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     buffer = SnapshotBuffer(d, window=3)
        ...     for step in (10, 20, 30, 40):
        ...         _ = buffer.push(step, model.state_dict())
        ...     buffer.wait()
        ...     buffer.steps
        ...     buffer.close()
        [20, 30, 40]
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        window: int,
        *,
        storage_dtype: torch.dtype | None = None,
        listener: WindowListener | None = None,
        retain: Callable[[], int | None] | None = None,
        max_pending: int = 0,
        images: int = 1,
    ):
        """``retain`` (background evaluation): returns the oldest step an evaluator still needs (None:
        every step); a snapshot leaving the window from that step on is kept on disk as *pending*, at
        most ``max_pending`` of them (the oldest beyond that are dropped: the evaluator records the gap).

        ``images``: how many snapshot images to keep. With 2, a push copies into the image the write in
        flight is not using, so it waits only for the write before that: snapshots closer together than
        a snapshot's background work no longer hold training up, for one more snapshot's worth of
        memory. At most ``images`` writes are then in flight, committed in order."""
        self.directory = Path(directory)
        self.window = require_int("window", window, 1)
        self.storage_dtype = storage_dtype
        self.listener = listener
        self.retain = retain
        self.max_pending = require_int("max_pending", max_pending, 0)
        self._retained: list[SnapshotEntry] = []
        self.layout: dict | None = None
        """How this rank's tensors make up the full ones (``state_dicts.shard_layout``), for a background
        evaluator that assembles them; written into the manifest when set."""
        # Steps dropped before an evaluator consumed them (newest last, bounded), for it to record.
        self._dropped: list[int] = []
        self._drops = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._io_executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._entries: list[SnapshotEntry] = []
        # File name -> reader of a window file already known good: written by this buffer (its checksum
        # taken from the very bytes written) or verified once since. The window average's rolling re-sum
        # reads a slice of every window file at each update; hashing the whole window each time would
        # cost O(window x P). An evicted file is verified in full by the read that subtracts it.
        self._readers: dict[str, LazySnapshot] = {}
        # Pinned host buffers for snapshots of CUDA weights, reused from one push to the next.
        self._staging = PinnedStaging() if torch.cuda.is_available() else None
        if images not in (1, 2):
            raise ValueError(f"images must be 1 or 2, got {images!r}")
        self._images = [SnapshotImage() for _ in range(images)]
        self._next_image = 0
        self._pushed: int | None = None  # the newest step pushed, committed or not
        self.committing_step: int | None = None
        """The step whose snapshot the listener is being given (set on the writer thread before the call)."""
        self._open()

    # ------------------------------------------------------------------ reading

    @property
    def entries(self) -> list[SnapshotEntry]:
        """Committed snapshots, oldest first (a write still in flight is not among them)."""
        with self._lock:
            return list(self._entries)

    @property
    def steps(self) -> list[int]:
        return [entry.step for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def pending_bytes(self) -> int:
        """Bytes on disk of the snapshots kept beyond the window for a background evaluator."""
        with self._lock:
            return sum(entry.bytes for entry in self._retained)

    def entry(self, step: int) -> SnapshotEntry:
        for entry in self.entries:
            if entry.step == step:
                return entry
        raise KeyError(f"no buffered snapshot at step {step}; buffered steps: {self.steps}")

    def load(self, step: int) -> CapturedState:
        """Read one snapshot back, verified against its checksum, with ties restored as aliases."""
        entry = self.entry(step)
        self._verify(entry)
        return CapturedState(load_file(str(self.directory / entry.file)), dict(entry.aliases))

    def open_lazy(self, step: int) -> LazySnapshot:
        """A verified snapshot whose tensors are read one at a time (memory-mapped)."""
        entry = self.entry(step)
        self._verify(entry)
        return LazySnapshot(self.directory / entry.file, entry.aliases)

    # ------------------------------------------------------------------ writing

    def push(self, step: int, state_dict: Mapping[str, torch.Tensor]) -> CapturedState:
        """Snapshot ``state_dict`` at ``step``: copy it to CPU now, write it in the background.

        Waits first for the previous write (with two images, for the write before it), and raises its
        error if it failed. Returns the CPU copy, valid and unchanged until the push that reuses its
        memory (``SnapshotImage``, or for CUDA weights pinned buffers: call ``synchronize()`` on it
        before reading it on the CPU). The snapshot that falls out of the window is deleted once the
        listener has seen it.
        """
        step = require_int("step", step, 0)
        self.wait_for_image()
        newest = max((s for s in (*self.steps[-1:], self._pushed) if s is not None), default=None)
        if newest is not None and step <= newest:
            raise ValueError(
                f"step {step} is not newer than the newest buffered snapshot ({newest}); "
                "call truncate_after(step - 1) first when resuming from an earlier step"
            )
        image = self._images[self._next_image]
        captured = image.capture(state_dict, self.storage_dtype, {"step": str(step)})
        if captured is None:
            self.wait()  # the pinned staging buffers are shared: no write may still be reading them
            captured = capture_state(state_dict, self.storage_dtype, self._staging)
        else:
            self._next_image = (self._next_image + 1) % len(self._images)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self._pending.append(self._executor.submit(self._commit, step, captured))
        self._pushed = step
        return captured

    @property
    def overlapping(self) -> bool:
        """Whether a push may return with an earlier write still in flight (two images)."""
        return len(self._images) > 1

    def wait_for_image(self) -> None:
        """Block until an image is free for the next push: every write in flight with one image, all but
        the newest with two. Raises the ``SnapshotError`` of a write that failed."""
        while len(self._pending) >= len(self._images):
            self._pending.popleft().result()

    def wait(self) -> None:
        """Block until every write in flight is committed; raise the first one's ``SnapshotError`` if any
        failed (the others are still waited for)."""
        failure: BaseException | None = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except SnapshotError as error:
                failure = failure or error
        if failure is not None:
            raise failure

    def truncate_after(self, step: int) -> list[int]:
        """Drop snapshots newer than ``step`` (resuming from ``step``); returns the dropped steps."""
        self.wait()
        self._pushed = None  # what is pushed next is judged against what is left
        with self._lock:
            keep = [e for e in self._entries if e.step <= step]
            dropped = [e for e in self._entries if e.step > step]
            retained = [e for e in self._retained if e.step <= step]
            dropped += [e for e in self._retained if e.step > step]
            self._dropped = [s for s in self._dropped if s <= step]
            if not dropped:
                return []
            self._write_manifest(keep, retained)
            self._entries = keep
            self._retained = retained
        for entry in dropped:
            self._remove(self.directory / entry.file)
        return [entry.step for entry in dropped]

    def drop(self, step: int, reason: str) -> None:
        """Remove one snapshot from the window (e.g. found corrupt), with a warning naming it."""
        with self._lock:
            keep = [e for e in self._entries if e.step != step]
            gone = [e for e in self._entries if e.step == step]
            if not gone:
                return
            self._write_manifest(keep)
            self._entries = keep
        logger.warning("dropping buffered snapshot %s: %s", self.directory / gone[0].file, reason)
        self._remove(self.directory / gone[0].file)

    def close(self) -> None:
        """Finish the write in flight and stop the writer thread."""
        try:
            self.wait()
        finally:
            for executor in (self._executor, self._io_executor):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._executor = self._io_executor = None
            for image in self._images:
                image.release()

    def window_sources(self) -> list[LazySnapshot]:
        """Lazy, verified readers for the buffered snapshots; corrupt ones are dropped with a warning."""
        sources = []
        for entry in self.entries:
            try:
                reader = self.open_lazy(entry.step)
            except CorruptSnapshotError as error:
                self.drop(entry.step, str(error))
                continue
            self._readers[entry.file] = reader
            sources.append(reader)
        return sources

    # ------------------------------------------------------------------ internals

    def _commit(self, step: int, captured: CapturedState) -> None:
        """Write the snapshot's file and, at the same time, let the listener (the window average) take it
        in; then commit both with the manifest and delete what left the window.

        The durable write runs on the I/O thread, checksumming each chunk just before writing it, while
        this thread runs the listener: the average's passes over memory and over the evicted file overlap
        the disk's work instead of following it. Neither commits anything until both are done: a failed
        write after the average took the snapshot in is reported, and the window re-sums from its files.
        """
        name = snapshot_file_name(step)
        path = self.directory / name
        with self._lock:
            committed = list(self._entries)
        leaving = max(0, len(committed) + 1 - self.window)
        evicted, kept = committed[:leaving], committed[leaving:]
        writing: Future | None = None
        try:
            try:
                # On a GPU the copy to host may still be in flight on its side stream.
                captured.synchronize()
                data = captured.file_image
                if data is None:
                    data = serialize_safetensors(
                        captured.tensors,
                        metadata={"step": str(step), "aliases": json.dumps(captured.aliases)},
                    )
                writing = self._io().submit(_write_snapshot_file, path, data, self.directory)
                size = len(data)
                del data
                if self.listener is not None:
                    # The listener reads the evicted file and the newest one (the weight drift's previous
                    # snapshot) front to back; asked for now, the disk reads them ahead while it adds.
                    _read_ahead([self.directory / e.file for e in (*evicted, *kept[-1:])])
                    self.committing_step = step
                    self.listener(
                        captured,
                        [self._loader(e) for e in evicted],
                        lambda: self._window_with(kept, captured),
                    )
                checksum = writing.result()
            except BaseException:
                if writing is not None:
                    # The file must be complete (or failed) before it can be removed.
                    futures_wait([writing])
                raise
        except Exception as error:
            self._remove(path)
            if isinstance(error, SnapshotError):
                raise
            what = "write" if writing is None or writing.exception() is not None else "commit"
            raise SnapshotError(step, f"could not {what} snapshot {path}: {error!r}") from error
        entry = SnapshotEntry(
            step=step,
            file=name,
            checksum=checksum,
            bytes=size,
            time=time.time(),
            aliases=dict(captured.aliases),
        )
        keep = [*kept, entry]
        try:
            retained, deleted = self._retention(evicted)
            with self._lock:
                self._write_manifest(keep, retained)
                self._entries = keep
                self._retained = retained
            self._readers[name] = LazySnapshot(path, entry.aliases)
        except Exception as error:
            self._remove(path)
            raise SnapshotError(step, f"could not commit snapshot {path}: {error!r}") from error
        for old in deleted:
            self._remove(self.directory / old.file)

    def _io(self) -> ThreadPoolExecutor:
        """The thread that writes snapshot files, so that the writer thread can average meanwhile."""
        if self._io_executor is None:
            self._io_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-io")
        return self._io_executor

    def _retention(self, evicted: list[SnapshotEntry]) -> tuple[list[SnapshotEntry], list[SnapshotEntry]]:
        """Which snapshots outside the window stay on disk for the evaluator, and which go."""
        if self.retain is None:
            return [], evicted
        needed = self.retain()
        outside = [*self._retained, *evicted]
        kept = [e for e in outside if needed is None or e.step >= needed]
        deleted = [e for e in outside if e not in kept]
        while len(kept) > self.max_pending:
            # Training never waits for the evaluator: the oldest it has not consumed are dropped.
            gone = kept.pop(0)
            deleted.append(gone)
            self._dropped.append(gone.step)
            self._drops += 1
            # Once, then every 100th: a run whose evaluator is not (yet) running drops at every snapshot.
            if self._drops % 100 == 1:
                logger.warning(
                    "the evaluator is more than %d snapshots behind (or not running): dropping step %d "
                    "unevaluated (%d dropped so far; the evaluator records each gap in the history)",
                    self.max_pending,
                    gone.step,
                    self._drops,
                )
        if needed is not None:
            self._dropped = [step for step in self._dropped if step >= needed]
        self._dropped = self._dropped[-_MAX_DROPPED_LISTED:]
        return kept, deleted

    def _loader(self, entry: SnapshotEntry) -> Callable[[], StreamedSnapshot]:
        """The evicted file, read once: verified by the same read that subtracts it (``StreamedSnapshot``)."""
        return lambda: StreamedSnapshot(self.directory, entry)

    def _window_with(self, keep: list[SnapshotEntry], captured: CapturedState) -> list[Mapping]:
        """The window the snapshot being written joins: readers of ``keep``'s files, then ``captured``. A
        file found corrupt leaves ``keep`` (the window the manifest is about to commit)."""
        sources: list[Mapping] = []
        for entry in list(keep):
            reader = self._readers.get(entry.file)
            if reader is None:
                try:
                    reader = self.open_lazy(entry.step)
                except CorruptSnapshotError as error:
                    keep.remove(entry)
                    logger.warning("dropping buffered snapshot %s: %s", self.directory / entry.file, error)
                    self._remove(self.directory / entry.file)
                    continue
                self._readers[entry.file] = reader
            sources.append(reader)
        sources.append(captured)
        return sources

    def _verify(self, entry: SnapshotEntry) -> None:
        verify_snapshot(self.directory, entry)

    def _write_manifest(
        self, entries: list[SnapshotEntry], retained: list[SnapshotEntry] | None = None
    ) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "window": self.window,
            "storage_dtype": None if self.storage_dtype is None else str(self.storage_dtype),
            "snapshots": [e.to_json() for e in entries],
        }
        if self.retain is not None:
            # Added keys: a reader of an older release reads "snapshots" and ignores them.
            kept = self._retained if retained is None else retained
            manifest["pending"] = [e.to_json() for e in kept]
            manifest["dropped"] = list(self._dropped)
        if self.layout is not None:
            manifest["layout"] = self.layout
        atomic_write_bytes(
            self.directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), inside=self.directory
        )

    def _remove(self, path: Path) -> None:
        self._readers.pop(path.name, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # a leftover is removed on the next open
            logger.warning("could not delete %s: %s", path, error)

    def _open(self) -> None:
        if self.directory.is_symlink():
            raise ValueError(f"buffer directory {self.directory} is a symlink; refusing to use it")
        self.directory.mkdir(parents=True, exist_ok=True)
        for child in self.directory.iterdir():
            if _TEMPORARY_NAME.match(child.name) and not child.is_symlink() and child.is_file():
                logger.info("removing stray temporary file %s", child)
                self._remove(child)
        entries, retained, changed = self._read_manifest()
        if len(entries) > self.window:
            entries, changed = entries[-self.window :], True
        if self.retain is None and retained:
            retained, changed = [], True  # nothing evaluates in the background any more: not kept
        self._retained = retained
        named = {e.file for e in [*entries, *retained]}
        for child in self.directory.iterdir():
            # Written but never committed (a crash before the manifest switch), or evicted and not yet
            # deleted: either way not part of the acknowledged window.
            orphan = _SNAPSHOT_NAME.match(child.name) and child.name not in named
            if orphan and (child.is_symlink() or child.is_file()):
                logger.info("removing snapshot file not named by the manifest: %s", child)
                self._remove(child)
        self._entries = entries
        if changed:
            self._write_manifest(entries)

    def _read_manifest(self) -> tuple[list[SnapshotEntry], list[SnapshotEntry], bool]:
        """The window's entries, the pending ones kept for an evaluator, and whether anything was wrong
        (the manifest is then rewritten)."""
        path = self.directory / MANIFEST
        if path.is_symlink():
            logger.warning("manifest %s is a symlink; ignoring it and starting an empty buffer", path)
            path.unlink()
            return [], [], True
        if not path.exists():
            return [], [], False
        try:
            manifest = read_json_object(path, f"manifest {path}")
            snapshots = manifest.get("snapshots")
            if not isinstance(snapshots, list):
                raise DamagedJSONError(f"manifest {path}: 'snapshots' is missing or not a list")
        except (OSError, ValueError) as error:  # DamagedJSONError is a ValueError
            logger.warning("%s; starting an empty buffer", error)
            return [], [], True
        pending = manifest.get("pending") or []
        dropped = manifest.get("dropped") or []
        self._dropped = [
            int(step) for step in dropped if isinstance(step, int) and not isinstance(step, bool)
        ]
        entries, changed = self._parse_entries(snapshots if isinstance(snapshots, list) else [], path)
        retained, damaged = self._parse_entries(pending if isinstance(pending, list) else [], path)
        if entries and retained and retained[-1].step >= entries[0].step:
            logger.warning("manifest %s: pending snapshots overlap the window; dropping them", path)
            retained, damaged = [], True
        return entries, retained, changed or damaged or not isinstance(pending, list)

    def _parse_entries(self, snapshots: list, path: Path) -> tuple[list[SnapshotEntry], bool]:
        """Manifest items as checked entries (each file verified); whether any was dropped."""
        entries: list[SnapshotEntry] = []
        # A manifest edited by hand (or by a tool) may list its entries out of order: judge them by step,
        # so an early entry listed last does not push out the whole window as "not increasing".
        ordered = sorted(snapshots, key=_entry_step_or_last)
        changed = ordered != snapshots
        snapshots = ordered
        for item in snapshots:
            try:
                entry = SnapshotEntry.from_json(item)
            except (KeyError, TypeError, ValueError) as error:
                logger.warning("manifest %s: dropping malformed entry %r (%s)", path, item, error)
                changed = True
                continue
            problem = _unsafe_entry_problem(self.directory, entry.file)
            match = _SNAPSHOT_NAME.match(entry.file)
            if problem is None and (match is None or int(match.group(1)) != entry.step):
                problem = f"file name does not match step {entry.step}"
            if problem is None and entries and entry.step <= entries[-1].step:
                problem = "steps in the manifest are not increasing"
            if problem is None:
                try:
                    self._verify(entry)
                    problem = _alias_problem(self.directory / entry.file, entry.aliases)
                except CorruptSnapshotError as error:
                    problem = str(error)
            if problem is not None:
                logger.warning("dropping buffered snapshot %r from %s: %s", entry.file, path, problem)
                changed = True
                continue
            entries.append(entry)
        return entries, changed


def verify_snapshot(directory: Path, entry: SnapshotEntry) -> None:
    """Check a buffered file against its manifest entry, reading it in chunks (no full copy).

    Raises:
        CorruptSnapshotError: the file is missing, not a plain file inside ``directory``, of another
            size, or fails its checksum.
    """
    path = directory / entry.file
    problem = _unsafe_entry_problem(directory, entry.file)
    if problem:
        raise CorruptSnapshotError(entry.step, f"{path}: {problem}")
    checksum = Checksum.new(entry.algorithm)
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                checksum.update(chunk)
                size += len(chunk)
    except OSError as error:
        raise CorruptSnapshotError(entry.step, f"{path}: cannot be read ({error})") from error
    _check_read(entry, path, size, checksum)


def _check_read(entry: SnapshotEntry, path: Path, size: int, checksum: Checksum) -> None:
    if size != entry.bytes:
        raise CorruptSnapshotError(
            entry.step, f"{path}: {size} bytes on disk, manifest says {entry.bytes} (truncated?)"
        )
    if checksum.hexdigest() != entry.checksum:
        raise CorruptSnapshotError(
            entry.step, f"{path}: {entry.algorithm} checksum does not match the manifest"
        )


def _write_snapshot_file(path: Path, data: memoryview, directory: Path) -> str:
    """Write a snapshot's bytes durably, each chunk checksummed just before it is written, while it is in
    the CPU's cache; returns the checksum."""
    checksum = Checksum.new()
    atomic_write_bytes(path, data, inside=directory, on_chunk=checksum.update)
    return checksum.hexdigest()


def read_layout(directory: str | os.PathLike) -> dict | None:
    """The shard layout a sharded run's rank manifest records (``SnapshotBuffer.layout``), or None."""
    try:
        layout = read_json_object(Path(directory) / MANIFEST).get("layout")
    except (OSError, ValueError):
        return None
    return layout if isinstance(layout, dict) and isinstance(layout.get("tensors"), dict) else None


def read_manifest(directory: str | os.PathLike) -> tuple[list[SnapshotEntry], list[int]]:
    """What a buffer's ``manifest.json`` lists, read by another process (an evaluator) without changing
    anything: every snapshot on disk, the window's and the ones pending for the evaluator, by step; and
    the steps dropped before the evaluator consumed them. Files are not verified here (the reader
    verifies what it loads). A missing or unreadable manifest lists nothing."""
    path = Path(directory) / MANIFEST
    try:
        manifest = read_json_object(path, f"manifest {path}")
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError) as error:  # the writer replaces it atomically: damage is real damage
        logger.warning("%s; reading no snapshots from it", error)
        return [], []
    entries = []
    for key in ("pending", "snapshots"):
        items = manifest.get(key) or []
        for item in items if isinstance(items, list) else []:
            try:
                entries.append(SnapshotEntry.from_json(item))
            except (KeyError, TypeError, ValueError):
                continue
    dropped = manifest.get("dropped") or []
    steps = (
        [s for s in dropped if isinstance(s, int) and not isinstance(s, bool)]
        if isinstance(dropped, list)
        else []
    )
    return sorted({entry.step: entry for entry in entries}.values(), key=lambda e: e.step), steps


class LazySnapshot(Mapping):
    """Read-only mapping over a verified snapshot file; each tensor is read when asked for.

    Each read opens the file afresh. safetensors hands out tensors backed by a memory map of the file,
    and a kept-open handle keeps every page it has served mapped, and counted as this process's resident
    memory: re-summing a window through open handles showed the whole window's files as resident
    (benchmarks/RESULTS.md, item 7). Opened per read, only the tensors still in use stay mapped.
    """

    def __init__(self, path: Path, aliases: Mapping[str, str]):
        self.path = path
        self.aliases = dict(aliases)
        with safe_open(str(path), framework="pt") as handle:
            self._keys = list(handle.keys())
        self._spans: dict[str, tuple[int, int, torch.dtype | None]] | None = None  # for read_elements

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name not in self._keys:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)

    def read_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows ``first:last`` of one tensor, flattened (a 0-d tensor whole); reads only those rows."""
        name = self.aliases.get(name, name)
        if name not in self._keys:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as handle:
            rows = handle.get_slice(name)
            tensor = handle.get_tensor(name) if len(rows.get_shape()) == 0 else rows[first:last]
        return tensor.reshape(-1)

    def read_elements(
        self, name: str, first: int, count: int, scratch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements ``first:first + count`` of one tensor, flattened, read with one ``pread`` into
        ``scratch`` (a uint8 buffer, grown when too small); returns them and the buffer to reuse. The
        values are valid until the buffer is used again."""
        name = self.aliases.get(name, name)
        if self._spans is None:
            with open(self.path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = handle.read(length)
            start = 8 + length
            self._spans = {
                span_name: (start + begin, end - begin, dtype)
                for begin, end, span_name, dtype in _tensor_spans(0, self.path, header)
            }
        if name not in self._spans:
            raise KeyError(name)
        offset, size, dtype = self._spans[name]
        if dtype is None:
            raise ValueError(f"{self.path}: {name!r} has a dtype this reader does not hand out")
        begin, wanted = first * dtype.itemsize, count * dtype.itemsize
        if first < 0 or begin + wanted > size:
            raise ValueError(f"{self.path}: {name!r} has no elements {first}:{first + count}")
        if scratch.numel() < wanted:
            scratch = torch.empty(wanted, dtype=torch.uint8)
        view = memoryview(scratch.numpy())[:wanted]  # type: ignore[arg-type]  # the buffer protocol
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(descriptor, [view], offset + begin)
        finally:
            os.close(descriptor)
        if got != wanted:
            raise ValueError(f"{self.path}: {name!r} is cut short ({got} of {wanted} bytes)")
        return scratch[:wanted].view(dtype), scratch

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def canonical_keys(self) -> list[str]:
        return list(self._keys)


class StreamedSnapshot(LazySnapshot):
    """A buffered file read once, front to back: every chunk checksummed and handed out as the pieces of
    tensors it holds, so that the read that uses the file is also the one that verifies it.

    The window average subtracts an evicted snapshot this way: one sequential read of the file instead of
    a verifying pass followed by a second read of every tensor. The pieces are used before the checksum
    is known, so whoever used them must undo that if :meth:`pieces` raises at the end (the average then
    re-sums the window from its files). Once :meth:`pieces` has run to its end, the file is verified and
    its tensors can be read as a :class:`LazySnapshot`'s.
    """

    def __init__(self, directory: Path, entry: SnapshotEntry, chunk_bytes: int = _IO_CHUNK):
        self.entry = entry
        self.chunk_bytes = chunk_bytes - chunk_bytes % 8
        problem = _unsafe_entry_problem(directory, entry.file)
        if problem:
            raise CorruptSnapshotError(entry.step, f"{directory / entry.file}: {problem}")
        super().__init__(directory / entry.file, entry.aliases)

    def pieces(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, first element, flat values)`` for every tensor of the file, in file order, a chunk at a
        time; the values are valid until the next piece is asked for (the chunk's memory is reused).

        Raises:
            CorruptSnapshotError: the file cannot be read, is not what the manifest says (size,
                checksum), or its header does not describe aligned tensors; possibly after pieces
                were handed out.
        """
        entry, path = self.entry, self.path
        checksum = Checksum.new(entry.algorithm)
        size = 0
        try:
            with open(path, "rb", buffering=0) as handle:
                prefix = handle.read(8)
                length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
                if not 0 < length <= min(entry.bytes, 100 << 20):
                    raise CorruptSnapshotError(entry.step, f"{path}: not a safetensors header")
                header = handle.read(length)
                checksum.update(prefix)
                checksum.update(header)
                size = 8 + len(header)
                spans = _tensor_spans(entry.step, path, header)
                chunk = torch.empty(self.chunk_bytes, dtype=torch.uint8)
                view = memoryview(chunk.numpy())  # type: ignore[arg-type]  # the buffer protocol
                position = 0  # bytes of the data section read so far
                next_span = 0
                while True:
                    got = _fill(handle, view)
                    if got == 0:
                        break
                    checksum.update(view[:got])
                    size += got
                    end = position + got
                    while next_span < len(spans) and spans[next_span][1] <= position:
                        next_span += 1
                    index = next_span
                    while index < len(spans) and spans[index][0] < end:
                        begin, stop, name, dtype = spans[index]
                        first, last = max(begin, position), min(stop, end)
                        if dtype is not None and last > first:
                            values = chunk[first - position : last - position].view(dtype)
                            yield name, (first - begin) // dtype.itemsize, values
                        index += 1
                    position = end
        except OSError as error:
            raise CorruptSnapshotError(entry.step, f"{path}: cannot be read ({error})") from error
        _check_read(entry, path, size, checksum)


def _read_ahead(paths: Sequence[Path]) -> None:
    """Ask the kernel to start reading these files into the page cache (``POSIX_FADV_WILLNEED``), so their
    reads overlap other work; a hint only: nothing happens where it is not supported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def _fill(handle, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; how many bytes came."""
    got = 0
    while got < len(view):
        count = handle.readinto(view[got:])
        if not count:
            break
        got += count
    return got


_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def _tensor_spans(step: int, path: Path, header: bytes) -> list[tuple[int, int, str, torch.dtype | None]]:
    """``(first byte, end byte, name, dtype)`` of each tensor in a safetensors header, in data order; dtype
    None for one this reader does not hand out (an exotic dtype: the average holds no such tensor)."""
    try:
        items = json.loads(header)
        spans = []
        for name, item in items.items():
            if name == "__metadata__":
                continue
            begin, end = (int(offset) for offset in item["data_offsets"])
            spans.append((begin, end, name, _DTYPES_BY_NAME.get(item["dtype"])))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CorruptSnapshotError(step, f"{path}: unreadable safetensors header ({error})") from error
    spans.sort()
    for begin, end, name, dtype in spans:
        itemsize = 1 if dtype is None else dtype.itemsize
        if begin % itemsize or (end - begin) % itemsize or end < begin:
            raise CorruptSnapshotError(step, f"{path}: tensor {name!r} is not aligned to its element size")
    return spans


def _entry_step_or_last(item: object) -> tuple[int, int]:
    """Sort key of a raw manifest entry: its step, malformed entries last (they are dropped anyway)."""
    step = item.get("step") if isinstance(item, dict) else None
    if type(step) is int:
        return (0, step)
    return (1, 0)


def _alias_problem(path: Path, aliases: Mapping[str, str]) -> str | None:
    """Why the manifest's tied-tensor aliases cannot be used with the file, or None."""
    if not aliases:
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as error:  # a header safetensors refuses: the file is as good as corrupt
        return f"unreadable safetensors header ({error})"
    for alias, target in aliases.items():
        if target not in keys:
            return f"alias {alias!r} names the tensor {target!r}, which the file does not hold"
        if alias in keys:
            return f"alias {alias!r} is also a tensor of the file"
    return None


def _unsafe_entry_problem(directory: Path, name: str) -> str | None:
    """Why a manifest file name must not be followed, or None if it is a plain snapshot file here."""
    if not _SNAPSHOT_NAME.match(name) or os.path.basename(name) != name:
        return "not a plain step-*.safetensors name inside the buffer directory"
    path = directory / name
    if path.is_symlink():
        return "is a symlink"
    if not path.is_file():
        return "file is missing"
    return None
