"""FollowedBuffer: a training run's buffer as its background evaluator reads it.

The training process writes the snapshot files and ``buffer/manifest.json`` (``SnapshotBuffer``); the
evaluator, another process, never writes there. It keeps its own window of the trainer's files — the
last ``window`` snapshots it has evaluated — and feeds the window average the same calls the
trainer's buffer would have made inline (the new snapshot, loaders of the ones leaving, a loader of
the whole window), so the evaluator's average equals an inline run's bit for bit.

What it needs is acknowledged in ``evaluator.json`` (written by the evaluator, atomically): the last
step consumed, its window's steps, and ``needed_from``, the oldest step whose file it still reads.
The trainer keeps every file from ``needed_from`` on, up to ``max_pending`` beyond its own window.

Example::

    buffer = FollowedBuffer("runs/exp/stability/buffer", window=5, listener=window.admit)
    for entry in buffer.unconsumed(after=None):
        captured = buffer.load(entry)          # verified against the trainer's checksum
        buffer.stage(entry.step, captured)
        buffer.push(entry.step, live)          # the average takes the file's tensors, not ``live``
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoint_stability.buffer import (
    CorruptSnapshotError,
    LazySnapshot,
    SnapshotEntry,
    StreamedSnapshot,
    WindowListener,
    read_layout,
    read_manifest,
    verify_snapshot,
)
from checkpoint_stability.state_dicts import CapturedState, assemble_shards
from checkpoint_stability.validation import require_int

logger = logging.getLogger(__name__)


class FollowedBuffer:
    """The evaluator's window over the trainer's buffered files (read-only); see the module docstring.

    It offers what :class:`~checkpoint_stability.window.SnapshotWindow` uses of a ``SnapshotBuffer``:
    ``push``, ``wait``, ``entries``, ``steps``, ``truncate_after``, ``drop``, ``window_sources``,
    ``open_lazy`` and ``close``; ``push`` writes nothing, it admits a snapshot the trainer wrote.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        window: int,
        *,
        listener: WindowListener | None = None,
        steps: list[int] = (),  # type: ignore[assignment]  # a default nobody mutates
        shards: Sequence[str | os.PathLike] = (),
    ):
        """``steps``: the window the evaluator had when it stopped (``evaluator.json``), to go on from.
        ``shards``: a sharded run's rank directories, in rank order (``directory`` is rank 0's): each
        snapshot is then the full tensors put together from every rank's file, as their manifests'
        ``layout`` says."""
        self.directory = Path(directory)
        self.shards = [Path(shard) for shard in shards]
        self.window = require_int("window", window, 1)
        self.listener = listener
        self._entries: list[SnapshotEntry] = []
        self._staged: dict[int, CapturedState] = {}
        known = {entry.step: entry for entry in read_manifest(self.directory)[0]}
        missing = [step for step in steps if step not in known]
        if missing:
            logger.warning(
                "the evaluator's window steps %s are no longer in %s; its average restarts from the rest",
                missing,
                self.directory,
            )
        self._entries = [known[step] for step in steps if step in known][-self.window :]

    # ------------------------------------------------------------------ the trainer's files

    def unconsumed(self, after: int | None) -> tuple[list[SnapshotEntry], list[int]]:
        """The snapshots on disk after step ``after`` (all of them for None), oldest first, and the steps
        the trainer dropped before the evaluator got to them."""
        entries, dropped = read_manifest(self.directory)
        fresh = [entry for entry in entries if after is None or entry.step > after]
        gaps = [step for step in dropped if after is None or step > after]
        return fresh, gaps

    def entry_at(self, step: int) -> SnapshotEntry | None:
        """The trainer's manifest entry of ``step`` in this directory, if it is on disk."""
        return next((entry for entry in read_manifest(self.directory)[0] if entry.step == step), None)

    def load(self, entry: SnapshotEntry) -> CapturedState:
        """One snapshot file's tensors, verified against the trainer's checksum first (every rank's
        file, put together, for a sharded run)."""
        if self.shards:
            return _captured(self._assembled(entry, verify=True), entry.aliases)
        verify_snapshot(self.directory, entry)
        return CapturedState(load_file(str(self.directory / entry.file)), dict(entry.aliases))

    def _assembled(self, entry: SnapshotEntry, *, verify: bool) -> dict[str, torch.Tensor]:
        pieces = []
        layout = None
        for directory in self.shards:
            mine = next((e for e in read_manifest(directory)[0] if e.step == entry.step), None)
            if mine is None:
                raise CorruptSnapshotError(entry.step, f"step {entry.step} is missing from {directory}")
            if verify:
                verify_snapshot(directory, mine)
            pieces.append(load_file(str(directory / mine.file)))
            layout = layout or read_layout(directory)
        if layout is None:
            raise CorruptSnapshotError(
                entry.step, f"{self.directory} records no shard layout: this run cannot be put together"
            )
        return assemble_shards(pieces, layout)

    def stage(self, step: int, captured: CapturedState) -> None:
        """The tensors the next ``push(step, ...)`` admits (the file's, as stored)."""
        self._staged = {step: captured}

    # ------------------------------------------------------------------ what SnapshotWindow uses

    @property
    def entries(self) -> list[SnapshotEntry]:
        return list(self._entries)

    @property
    def steps(self) -> list[int]:
        return [entry.step for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, step: int, state_dict: Mapping[str, torch.Tensor]) -> CapturedState:
        """Admit the staged snapshot of ``step`` into the window (``state_dict`` is not read: the average
        takes the stored values, as inline)."""
        captured = self._staged.pop(step, None)
        if captured is None:
            raise RuntimeError(f"step {step} was not staged: call load() and stage() first")
        entry = next((e for e in read_manifest(self.directory)[0] if e.step == step), None)
        if entry is None:
            raise CorruptSnapshotError(step, f"step {step} is no longer in {self.directory}")
        window = [*self._entries, entry]
        keep, evicted = window[-self.window :], window[: -self.window]
        if self.listener is not None:
            self.listener(captured, [self._loader(e) for e in evicted], lambda: self._sources(keep, captured))
        self._entries = keep
        return captured

    def wait(self) -> None:
        """Nothing in flight: ``push`` admits synchronously."""

    def close(self) -> None:
        self._staged = {}

    def truncate_after(self, step: int) -> list[int]:
        dropped = [entry.step for entry in self._entries if entry.step > step]
        self._entries = [entry for entry in self._entries if entry.step <= step]
        return dropped

    def drop(self, step: int, reason: str) -> None:
        if step in self.steps:
            logger.warning("leaving step %d out of the evaluator's window: %s", step, reason)
            self._entries = [entry for entry in self._entries if entry.step != step]

    def open_lazy(self, step: int) -> Mapping[str, torch.Tensor]:
        entry = next((e for e in self._entries if e.step == step), None)
        if entry is None:
            raise KeyError(f"no snapshot at step {step} in the evaluator's window {self.steps}")
        if self.shards:
            return _captured(self._assembled(entry, verify=True), entry.aliases)
        verify_snapshot(self.directory, entry)
        return LazySnapshot(self.directory / entry.file, entry.aliases)

    def window_sources(self) -> list[Mapping[str, torch.Tensor]]:
        """Verified readers of the window's files; a corrupt or vanished one leaves the window."""
        sources = []
        for entry in list(self._entries):
            try:
                sources.append(self.open_lazy(entry.step))
            except CorruptSnapshotError as error:
                self.drop(entry.step, str(error))
        return sources

    # ------------------------------------------------------------------ internals

    def _loader(self, entry: SnapshotEntry) -> Callable[[], Mapping[str, torch.Tensor]]:
        if self.shards:
            return lambda: self._assembled(entry, verify=True)

        # As inline: read once, verified by the read that subtracts it, so both sides average alike.
        return lambda: StreamedSnapshot(self.directory, entry)

    def _sources(self, keep: list[SnapshotEntry], captured: CapturedState) -> list[Mapping]:
        newest = keep[-1].step
        sources: list[Mapping] = []
        for entry in keep:
            if entry.step == newest:
                sources.append(captured)
            elif self.shards:
                sources.append(self._assembled(entry, verify=False))
            else:
                # Verified when it was admitted; the rolling re-sum reads slices of it (as inline).
                sources.append(LazySnapshot(self.directory / entry.file, entry.aliases))
        return sources


def _captured(full: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> CapturedState:
    """Put-together tensors as a ``CapturedState``: a name that is the very same tensor object as an
    earlier one (a tied parameter of an FSDP1 flat shard, which the layout lists once) becomes an alias
    of it, so it is averaged once, as a tied tensor is inline."""
    first: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied = dict(aliases)
    for name, tensor in full.items():
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            tensors[name] = tensor
    return CapturedState(tensors, tied)


__all__ = ["FollowedBuffer"]
