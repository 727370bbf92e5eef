"""SnapshotWindow: one rank's rolling window of snapshots — the on-disk buffer, its running average,
which snapshots may join them, and how far the weights moved at each."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from checkpoint_stability.averaging import DriftRequest, WindowAverage
from checkpoint_stability.buffer import SnapshotBuffer, SnapshotError
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.diagnostics import WeightDrift
from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.faults import FaultPolicy, describe_error
from checkpoint_stability.followed_buffer import FollowedBuffer
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.state_dicts import (
    CapturedState,
    capture_state,
    gather_full_state,
    write_into,
)

logger = logging.getLogger(__name__)

_KEPT_DRIFTS = 8
"""How many steps' drifts :meth:`SnapshotWindow.drift_of` remembers: the caller reads each one right after
its snapshot, so a few cover a caller that reads late, and memory stays bounded over a long run."""


class NonFiniteWeightsError(CheckpointStabilityError, ValueError):
    """A snapshot holds NaN or infinite weights."""


class InsufficientDiskError(CheckpointStabilityError, OSError):
    """The run directory's disk cannot hold the snapshot buffer at its fullest."""


def _bytes_of(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


class SnapshotWindow:
    """The last ``window`` snapshots of this rank's weights (all of them on rank 0, or its shards), on
    disk in a :class:`SnapshotBuffer`, with their :class:`WindowAverage` kept in step by the buffer's
    writer thread.

    A snapshot joins the window only when its weights are as training left them: a NaN or infinity in
    a parameter, or more of them in a buffer than in the last admitted snapshot, keeps it out (its file
    is removed, its step remembered in ``non_finite_steps`` so selection skips it). A causal mask of
    ``-inf`` is how a model is built, so it is admitted, and averaged from the newest snapshot.

    Faults (a failed write, a rejected snapshot) go to the monitor's :class:`FaultPolicy`; a failed
    write re-sums the average from the files that made it.

    With ``config.drift`` (the default), each admitted snapshot's :class:`WeightDrift` — how far it is
    from the previous snapshot and from the window average it joined — is measured on the writer thread,
    right after the average took it in, and kept for :meth:`drift_of`. The training thread's ``push``
    does no more work for it.

    Example::

        >>> import tempfile, torch
        >>> from checkpoint_stability.config import StabilityConfig
        >>> from checkpoint_stability.runtime import Runtime
        >>> window = SnapshotWindow(StabilityConfig(window=2), FaultPolicy("raise", Runtime))
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     window.open(d)
        ...     for step in (1, 2, 3):
        ...         with torch.no_grad():
        ...             _ = model.weight.fill_(step)
        ...         _ = window.push(step, model.state_dict())
        ...     window.wait()
        ...     window.steps, window.average.mean()["weight"].tolist()
        ...     [round(value, 4) for value in window.drift_of(3).relative()]  # |1 1|/|3 3|, |.5 .5|/|3 3|
        ...     window.release()
        ([2, 3], [[2.5, 2.5]])
        [0.3333, 0.1667]
    """

    def __init__(self, config: StabilityConfig, faults: FaultPolicy):
        self.config = config
        self.faults = faults
        self.average = WindowAverage(config.accumulator_torch_dtype, config.exact_sum_interval)
        self.buffer: SnapshotBuffer | FollowedBuffer | None = None
        self.averaging = True
        """Whether this side keeps the window average (not the training side of background evaluation)."""
        self.live_dtypes: dict[str, torch.dtype] = {}
        """The dtypes of the live tensors at the last push (exports are cast back to them)."""
        self.parameter_names: set[str] = set()
        """State-dict names that are parameters: NaN there is always training's doing."""
        self.non_finite_steps: set[int] = set()
        """Steps whose snapshot was kept out for NaN or infinite weights."""
        self._writing_step: int | None = None
        self._pushed_shapes: dict[str, tuple] | None = None
        # Non-finite element counts per tensor in the last admitted snapshot (None: none admitted yet).
        self._admitted_non_finite: dict[str, int] | None = None
        self._storage_range_checked = False
        self.storage_note: str | None = None
        """After the first snapshot: what one snapshot costs in memory and on disk, and whether the disk
        holds the buffer at its fullest (one line, for the console)."""
        # Written by the writer thread, read after wait(): the drift of the last few admitted snapshots.
        self._drifts: OrderedDict[int, WeightDrift | None] = OrderedDict()
        self._drift_warned = False

    @property
    def files(self) -> SnapshotBuffer | FollowedBuffer:
        """The open buffer (a ``RuntimeError`` before :meth:`open`)."""
        if self.buffer is None:
            raise RuntimeError("the snapshot window is not open")
        return self.buffer

    @property
    def steps(self) -> list[int]:
        """The steps in the window, oldest first (a write still in flight is not among them)."""
        return [] if self.buffer is None else self.buffer.steps

    def open(
        self,
        directory: str | os.PathLike,
        resume_step: int | None = None,
        *,
        retain: Callable[[], int | None] | None = None,
        follow: Sequence[int] | None = None,
        shards: Sequence[str | os.PathLike] = (),
    ) -> None:
        """Open the buffer in ``directory``; when resuming, drop snapshots newer than ``resume_step``;
        re-sum the average from the files.

        ``retain`` (the training side of background evaluation): the buffer keeps what the evaluator
        still needs (``SnapshotBuffer``'s ``retain``) and no average is kept here: the evaluator keeps
        its own. ``follow`` (the evaluator): the window is the evaluator's over the trainer's files
        (:class:`~checkpoint_stability.followed_buffer.FollowedBuffer`), starting from these steps;
        ``shards``: the rank directories of a sharded run it puts together."""
        self.averaging = retain is None
        if follow is not None:
            self.buffer = FollowedBuffer(
                directory,
                self.config.window,
                listener=_weak_listener(self),
                steps=list(follow),
                shards=shards,
            )
        else:
            self.buffer = SnapshotBuffer(
                directory,
                self.config.window,
                storage_dtype=self.config.storage_torch_dtype,
                # Weakly: the buffer's writer thread must not keep the window (and its monitor) alive.
                listener=_weak_listener(self) if self.averaging else None,
                retain=retain,
                max_pending=self.config.pending_bound if retain is not None else 0,
                images=self.config.snapshot_images,
            )
        self._admitted_non_finite = None  # judged afresh: the first snapshot admits how buffers are built
        if resume_step is not None:
            dropped = self.files.truncate_after(resume_step)
            if dropped:
                logger.info("resuming from step %d: dropped newer snapshots %s", resume_step, dropped)
        self.rebuild_average()

    def push(self, step: int, live: dict[str, torch.Tensor]) -> CapturedState | None:
        """Copy ``live`` into the window (written in the background); None if that failed (reported)."""
        self.live_dtypes = {name: tensor.dtype for name, tensor in live.items()}
        self._make_room()
        shapes = {name: tuple(tensor.shape) for name, tensor in live.items()}
        mismatch = None
        if not self.overlapping or shapes != self._pushed_shapes:
            # With two images a write may still be updating the average: it is read only once they have
            # settled, which a model that changes nothing (names, shapes) since the last push never needs.
            if self.overlapping:
                self.wait()
            mismatch = self.average.mismatch(live)
        self._pushed_shapes = shapes
        if mismatch is not None:
            # A changed model (new layers, a torch.compile prefix) cannot share a window with the old
            # one; keeping the old snapshots would jam every later push.
            logger.warning("%s: restarting the window from step %d", mismatch, step)
            try:
                self.files.truncate_after(-1)
            except Exception as error:
                self.faults.report("snapshot", error, step=step)
            self.average.reset([])
        if not self._storage_range_checked:
            self._storage_range_checked = True
            self._check_storage_range(step, live)
        self._writing_step = step  # a buffer without committing_step admits synchronously: this one
        try:
            captured = self.files.push(step, live)
        except Exception as error:
            self.faults.report("snapshot", error, step=step)
            if self.average.stale:  # the snapshot was refused half-way into the sum
                self.wait()
                self.rebuild_average()
            return None
        if self.storage_note is None:
            self._check_disk_budget(step, captured, live)
        return captured

    def drift_of(self, step: int) -> WeightDrift | None:
        """How far the weights moved at the snapshot of ``step`` (valid after :meth:`wait`).

        None when ``config.drift`` is off, when that snapshot was kept out of the window or its write
        failed, when measuring it failed (warned once), or when it is older than the last few snapshots.
        """
        return self._drifts.get(step)

    @property
    def overlapping(self) -> bool:
        """Whether a push may return with the previous snapshot's write still in flight
        (``config.snapshot_images == 2``): what was measured then is final only after :meth:`wait`."""
        return bool(getattr(self.buffer, "overlapping", False))

    def _make_room(self) -> None:
        """Before a push: wait for the write whose image the push reuses (every write, with one image)."""
        wait_for_image = getattr(self.files, "wait_for_image", None)
        if wait_for_image is None or not self.overlapping:
            self.wait()
            return
        try:
            wait_for_image()
        except SnapshotError as error:
            self.wait()  # the other write too, so that the average is rebuilt from a settled buffer
            self._write_failed(error)

    def wait(self) -> None:
        """Wait for the writes in flight; a failed write is reported and the average re-summed."""
        try:
            self.files.wait()
        except SnapshotError as error:
            self._write_failed(error)

    def _write_failed(self, error: SnapshotError) -> None:
        # The drift may have been measured before the commit failed: the snapshot is not in the window.
        self._forget_drift(error.step)
        self.faults.report("snapshot", error, step=error.step)
        try:
            self.rebuild_average()
        except Exception as rebuild_error:
            self.faults.report("snapshot", rebuild_error, step=error.step)
            self.average.invalidate()

    def rebuild_average(self) -> None:
        """Rebuild the average exactly from the window's files (nothing when this side keeps none)."""
        if not self.averaging:
            return
        sources = self.files.window_sources()
        aliases = self.files.entries[-1].aliases if self.files.entries else {}
        self.average.reset(sources, aliases=aliases)

    def agree(self, runtime: Runtime) -> None:
        """Sharded runs: every rank keeps only the steps that every rank has (a write may fail on one).
        Collective."""
        mine = self.files.steps
        common = set.intersection(*(set(steps) for steps in runtime.all_gather_object(mine)))
        extra = [step for step in mine if step not in common]
        for step in extra:
            self.files.drop(step, "not buffered on every rank (a write failed on another rank)")
        if extra:
            self.rebuild_average()

    def close(self) -> None:
        """Finish the write in flight; a failure is reported and the average re-summed."""
        if self.buffer is None:
            return
        try:
            self.buffer.close()
        except SnapshotError as error:
            self._forget_drift(error.step)
            self.faults.report("snapshot", error, step=error.step)
            self.rebuild_average()

    def release(self) -> None:
        """Let the writer thread go without reporting (after :meth:`close`, or when abandoning)."""
        if self.buffer is not None:
            with contextlib.suppress(SnapshotError):
                self.buffer.close()

    def averaged_state(
        self,
        model: torch.nn.Module | None,
        live: dict[str, torch.Tensor] | None,
        runtime: Runtime,
        sharded: bool,
        step: int,
    ) -> CapturedState | None:
        """The window average in the live model's dtypes, whole, on rank 0 (None elsewhere).

        Sharded weights: every rank swaps its averaged shards in, the full model is gathered once to
        rank 0 on CPU, and the live shards are restored bit for bit. Collective in that case.
        """
        if not sharded:
            return self.average.captured(self.live_dtypes)
        if model is None or live is None:
            raise ValueError("averaging sharded weights for export needs the model and its live tensors")
        backup = capture_state(live)
        try:
            self.average.copy_into(live)
            return gather_full_state(model, runtime.is_main)
        finally:
            self.restore(live, backup, step)

    def restore(self, live: dict[str, torch.Tensor], backup: CapturedState, step: int) -> None:
        """Put the live weights back after the average was swapped in. If that fails the model no longer
        holds its own weights, so the fault is reported loudly, through the fault policy like any other."""
        try:
            write_into(live, backup)
        except Exception as error:
            self.faults.report(
                "restore",
                RuntimeError(
                    "the live weights could not be restored after the averaged evaluation "
                    f"({describe_error(error)}); the model may hold averaged weights from here on"
                ),
                step=step,
                agreed=True,
            )

    # ------------------------------------------------------------------ admission

    def _check_storage_range(self, step: int, live: dict[str, torch.Tensor]) -> None:
        """At the first snapshot: finite values that ``storage_dtype`` turns into infinities are a
        configuration error (e.g. a ``finfo(float32).min`` mask stored as float16), named once."""
        dtype = self.config.storage_torch_dtype
        if dtype is None:
            return
        largest = torch.finfo(dtype).max
        for name, tensor in live.items():
            if (
                not tensor.is_floating_point()
                or tensor.numel() == 0
                or torch.finfo(tensor.dtype).max <= largest
            ):
                continue
            finite = tensor[torch.isfinite(tensor)]
            if finite.numel() and float(finite.abs().max()) > largest:
                self.faults.report(
                    "config",
                    ValueError(
                        f"storage_dtype={str(dtype).removeprefix('torch.')!r} cannot hold {name!r}: it holds "
                        f"finite values up to {float(finite.abs().max()):.4g} and the largest {dtype} is "
                        f"{largest:.4g}, so they are stored as infinity. Use storage_dtype='bfloat16' "
                        "(float32's range) or None"
                    ),
                    step=step,
                )
                return

    def _check_disk_budget(
        self, step: int, captured: CapturedState, live: Mapping[str, torch.Tensor]
    ) -> None:
        """At the first snapshot: the memory it keeps allocated, and whether the run directory's disk holds
        the buffer at its fullest: the window, the snapshots kept for a background evaluator, one more being
        written, and one export (in the live dtypes). A shortfall is reported with the figures (fatal with
        ``on_error="raise"``): it would otherwise surface, much later, as snapshots failing for lack of
        space."""
        buffer = self.files
        if not isinstance(buffer, SnapshotBuffer):
            return
        image = captured.file_image
        snapshot = len(image) if image is not None else _bytes_of(captured.tensors.values())
        distinct = {tensor.data_ptr(): tensor for tensor in live.values() if tensor.numel()}
        export = _bytes_of(distinct.values())
        pending = buffer.max_pending if buffer.retain is not None else 0
        copies = self.config.snapshot_images  # snapshots that can be in flight at once
        needed = (self.config.window + pending + copies) * snapshot + export
        held = sum(entry.bytes for entry in buffer.entries) + buffer.pending_bytes
        try:
            free = shutil.disk_usage(buffer.directory).free
        except OSError as error:  # nothing to compare with: the check is a courtesy, never a failure
            logger.info("could not read the free space of %s: %s", buffer.directory, error)
            free = None
        parts = f"window {self.config.window}" + (f" + {pending} pending" if pending else "")
        accumulator = self.config.accumulator_torch_dtype.itemsize
        window_sum = sum(t.numel() * accumulator for t in captured.tensors.values() if t.is_floating_point())
        available = "" if free is None else f", {_size(free + held)} available"
        kept = (
            "a copy of that size stays"
            if copies == 1
            else f"snapshot_images=2: two copies, {_size(2 * snapshot)}, stay"
        )
        self.storage_note = (
            f"[stability] each snapshot: {_size(snapshot)} ({kept} allocated for the next ones; the "
            f"window sum adds {_size(window_sum)}); disk needed at most {_size(needed)} ({parts} + "
            f"{copies} being written + 1 export){available}"
        )
        logger.debug("%s", self.storage_note)
        if free is not None and needed > free + held:
            self.faults.report(
                "config",
                InsufficientDiskError(
                    f"the disk of {buffer.directory} has {_size(free)} free (plus {_size(held)} already "
                    f"buffered), and the snapshot buffer needs up to {_size(needed)}: {parts} snapshots of "
                    f"{_size(snapshot)}, {copies} more being written and 1 export of {_size(export)}. "
                    "Snapshots will fail once the disk is full: free space, lower `window`, or store "
                    "snapshots in half the space with storage_dtype='bfloat16'"
                ),
                step=step,
            )

    def admit(self, added: CapturedState, evicted, window) -> None:
        """The buffer's listener (writer thread): a snapshot with NaN or infinite weights that training
        made is kept out of the window, so it cannot poison the average; the others join the average,
        and then their drift is measured (``config.drift``)."""
        committing = getattr(self.buffer, "committing_step", None)
        step = committing if committing is not None else (self._writing_step or 0)
        before = self._admitted_non_finite

        def judge(non_finite: dict[str, int]) -> None:
            made = sorted(
                name
                for name, count in non_finite.items()
                if name in self.parameter_names or (before is not None and count > before.get(name, 0))
            )
            if made:
                self.non_finite_steps.add(step)
                raise NonFiniteWeightsError(
                    f"the weights at step {step} are not finite ({made[0]!r} holds NaN or infinity); the "
                    "snapshot is kept out of the window average and of selection"
                )
            self._admitted_non_finite = non_finite

        previous = _PreviousSnapshot(self, evicted, window) if self.config.drift else None
        request = previous.request() if previous is not None else None
        self.average.update(
            added, evicted if previous is None else previous.evicted, window, judge=judge, drift=request
        )
        if previous is not None:
            self._measure_drift(step, added, previous, request)

    # ------------------------------------------------------------------ drift

    def _measure_drift(
        self, step: int, added: CapturedState, previous: _PreviousSnapshot, request: DriftRequest | None
    ) -> None:
        """Keep ``added``'s drift: measured by the average's update in the pass that subtracted the evicted
        snapshot (``request``), else measured here. A failure costs the drift of this step, never the
        snapshot."""
        drift: WeightDrift | None
        try:
            source = previous.source()
            if request is not None and request.sums is not None:
                current_sq, previous_sq, average_sq = request.sums
            else:
                current_sq, previous_sq, average_sq = self.average.drift_sums(added, source)
            drift = WeightDrift(
                step=step,
                previous_step=None if source is None else previous.step,
                n_models=self.average.count,
                current_sq=current_sq,
                previous_sq=previous_sq,
                average_sq=average_sq,
            )
        except Exception as error:
            drift = None
            if not self._drift_warned:
                self._drift_warned = True
                logger.warning(
                    "could not measure the weight drift at step %d (%s); the snapshot is kept, its drift "
                    "is missing (further failures are not logged)",
                    step,
                    describe_error(error),
                )
        self._drifts[step] = drift
        self._drifts.move_to_end(step)
        while len(self._drifts) > _KEPT_DRIFTS:
            self._drifts.popitem(last=False)

    def _forget_drift(self, step: int | None) -> None:
        if step is not None:
            self._drifts.pop(step, None)


class _PreviousSnapshot:
    """The newest snapshot in the window before the one being admitted (``θ_prev`` of the drift), found
    before the average takes the new one in.

    Usually it stays in the window and is read through the buffer's verified reader of its file. With a
    window of one it is the snapshot leaving: the average reads it to subtract it, through the loader
    wrapped here, which keeps what it loaded so that the file is verified (hashed) once, not twice.
    """

    def __init__(
        self,
        owner: SnapshotWindow,
        evicted: Sequence[Callable[[], Mapping[str, torch.Tensor]]],
        window: Callable[[], Sequence[Mapping]],
    ):
        entries = owner.files.entries  # the committed window, without the snapshot being admitted
        # An empty average is an empty or restarted window (a changed model): nothing to compare with.
        newest = entries[-1] if entries and owner.average.count else None
        self.step = None if newest is None else newest.step
        self._file = None if newest is None else newest.file
        self._window = window
        self._leaving: Mapping[str, torch.Tensor] | None = None
        self.evicted = list(evicted)
        """The eviction loaders to give the average (the previous snapshot's wrapped, when it leaves)."""
        self._leaves = newest is not None and len(self.evicted) == len(entries)
        if self._leaves:
            load = self.evicted[-1]

            def load_and_keep() -> Mapping[str, torch.Tensor]:
                if self._leaving is None:
                    self._leaving = load()
                return self._leaving

            self.evicted[-1] = load_and_keep

    def request(self) -> DriftRequest | None:
        """The average's fused measurement of the drift from this snapshot; None when the previous
        snapshot cannot be found now (it is then looked for again, and reported, after the update)."""
        try:
            return DriftRequest(self.source())
        except Exception:
            return None

    def source(self) -> Mapping[str, torch.Tensor] | None:
        """A reader of the previous snapshot's tensors; None when there is none (or it was found corrupt
        and dropped from the window)."""
        if self.step is None:
            return None
        if self._leaves:
            return self.evicted[-1]()
        for source in self._window():
            path = getattr(source, "path", None)
            if path is not None and os.path.basename(path) == self._file:
                return source
        return None


def _weak_listener(window: SnapshotWindow):
    method = weakref.WeakMethod(window.admit)

    def admit(*args) -> None:
        bound = method()
        if bound is None:
            raise RuntimeError("the window of this buffer is gone")
        bound(*args)

    return admit
