"""WindowAverage: the uniform mean of the snapshots in the window, kept up to date in O(P) per snapshot."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from checkpoint_stability.exact_sums import exact_sum, row_blocks
from checkpoint_stability.state_dicts import (
    CapturedState,
    copy_into_tensor,
    is_plain_layout,
    non_finite_counts,
)
from checkpoint_stability.validation import require_int

logger = logging.getLogger(__name__)

# Elements added, subtracted or re-summed at a time. A re-sum's float64 partial sum of this many elements
# is 16 MB, small enough to come back from the heap; and adding a bfloat16 snapshot into the float32 sum
# slice by slice is faster than in one call on these CPUs (benchmarks/RESULTS.md, item 2, measures it).
_SLICE_ELEMENTS = 1 << 21


# Elements per partial sum of the drift's sums of squares (``DriftSums``): small enough that the block and
# its scratch copies stay in the L2 cache; each block's float32 sum of squares is added into a float64
# total. Cheaper than widening every block to float64 first (benchmarks/RESULTS.md, item 9). And no larger
# than torch's grain size (32768 elements), below which an operation runs on the calling thread alone: at
# 65536, every one of the block's operations woke OpenMP's other thread, and on 2 busy cores the drift of
# a 355M model took 2.3 s per snapshot instead of 1.0 s.
_DRIFT_BLOCK = 1 << 15


def _in_slices(total: torch.Tensor, tensor: torch.Tensor, operation) -> None:
    """``operation(total, tensor)`` (an in-place add or subtract), applied slice by slice."""
    flat_total, flat = total.view(-1), tensor.reshape(-1)
    for begin in range(0, flat_total.numel(), _SLICE_ELEMENTS):
        end = begin + _SLICE_ELEMENTS
        operation(flat_total[begin:end], flat[begin:end])


class WindowAverage:
    """Running uniform mean over a sliding window of state dicts.

    Each new snapshot is added to a running sum and the snapshot leaving the window is subtracted,
    so an update costs O(P) whatever the window size. Floating tensors (parameters and floating
    buffers, as ``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` treats them) are averaged;
    non-floating ones (step counters, integer buffers) are taken from the newest snapshot.

    Add-and-subtract in a float32 sum lets rounding error random-walk, so the sum is rebuilt exactly
    from the window's snapshots (summed in float64), which bounds the drift. The rebuild is spread
    over the updates: each update re-sums the next ``1/exact_sum_every`` of the elements, so every element
    is rebuilt at least once per ``exact_sum_every`` updates and no single update pays for a whole-window
    re-sum. With ``exact_sum_every == window`` (the default the monitor uses) an update reads ``P/window``
    elements from each of the ``window`` snapshots, P in all whatever the window: the cost per update
    stays O(P) and flat. With a storage dtype the sum adds exactly the stored (rounded) values, so
    subtracting an evicted snapshot read back from disk cancels what was added.

    Example::

        >>> import torch
        >>> from checkpoint_stability.averaging import WindowAverage
        >>> from checkpoint_stability.state_dicts import CapturedState
        >>> average = WindowAverage(exact_sum_every=100)
        >>> a = CapturedState({"w": torch.tensor([1.0, 2.0])})
        >>> b = CapturedState({"w": torch.tensor([3.0, 6.0])})
        >>> average.update(a)
        >>> average.update(b)
        >>> average.mean()["w"]
        tensor([2., 4.])
        >>> average.update(CapturedState({"w": torch.tensor([5.0, 0.0])}), evicted=[lambda: a])
        >>> average.mean()["w"], average.count
        (tensor([4., 3.]), 2)
    """

    def __init__(
        self,
        accumulator_dtype: torch.dtype = torch.float32,
        exact_sum_every: int | None = None,
        *,
        resum_every: int | None = None,
    ):
        """``resum_every``: the deprecated name of ``exact_sum_every`` (goes in the next release)."""
        if resum_every is not None:
            warnings.warn(
                "WindowAverage(resum_every=...) is deprecated; use exact_sum_every",
                DeprecationWarning,
                stacklevel=2,
            )
            exact_sum_every = exact_sum_every if exact_sum_every is not None else resum_every
        if accumulator_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"accumulator_dtype must be torch.float32 or torch.float64, got {accumulator_dtype}"
            )
        self.accumulator_dtype = accumulator_dtype
        self.exact_sum_every = require_int("exact_sum_every", exact_sum_every, 1, optional=True)
        self._sum: dict[str, torch.Tensor] = {}
        self._newest: dict[str, torch.Tensor] = {}  # non-floating tensors of the newest snapshot
        self._dtypes: dict[str, torch.dtype] = {}  # dtype of each floating tensor as given
        self._aliases: dict[str, str] = {}
        # Floating tensors holding NaN/inf somewhere in the window (a mask buffer): taken from the newest.
        self._held: set[str] = set()
        self._count = 0
        self._slices: list[tuple[str, int, int, int, int]] | None = None  # the rolling re-sum's units
        self._cursor = 0  # the next slice the rolling re-sum rebuilds
        self._stale = False

    @property
    def count(self) -> int:
        """How many snapshots the average currently holds."""
        return self._count

    def invalidate(self) -> None:
        """Mark the running sum untrustworthy (a commit failed half-way); the next update re-sums."""
        self._stale = True

    @property
    def stale(self) -> bool:
        """Whether the running sum must be rebuilt before it is used (see :meth:`invalidate`)."""
        return self._stale

    def update(
        self,
        added: CapturedState,
        evicted: Sequence[Callable[[], Mapping[str, torch.Tensor]]] = (),
        window: Callable[[], Sequence[Mapping[str, torch.Tensor]]] | None = None,
        judge: Callable[[dict[str, int]], None] | None = None,
        drift: DriftRequest | None = None,
    ) -> None:
        """Add ``added`` and subtract the snapshots produced by the ``evicted`` loaders.

        ``window`` loads the whole new window (``added`` last): the rolling exact re-sum reads its
        slices from it, and it rebuilds the whole sum when the sum is stale.

        ``judge`` sees how many NaN or infinite elements each floating tensor of ``added`` holds (only
        those holding some) before anything is subtracted, and may refuse the snapshot by raising: the
        sum is then stale (it holds part of ``added``) until the next re-sum. Finiteness is checked in
        the pass that adds, a slice at a time while the slice is in the cache, not in a pass of its own.

        An evicted loader may return a :class:`~checkpoint_stability.buffer.StreamedSnapshot`: it is then
        subtracted from the same single read that verifies the file; if the file turns out not to be
        what the manifest says, the window is re-summed from ``window`` instead (the subtraction is
        undone). ``drift``: measure the added snapshot's drift in that same pass (:class:`DriftRequest`).
        """
        added.synchronize()
        if window is not None and self._stale:
            if judge is not None:
                judge(non_finite_counts(added.tensors))
            self.reset(window(), aliases=added.aliases)
            return
        if self._stale:
            raise RuntimeError("the window average is stale and no window loader was given to re-sum it")
        self._check_keys(added.tensors)
        self._stale = True  # until the snapshot is in and the evicted ones are out
        # Every snapshot in the sum leaves (a window of one): the sum becomes the new snapshot, exactly,
        # and there is nothing to subtract.
        replacing = bool(evicted) and len(evicted) >= self._count
        counts = self._add(added, replace=replacing)
        if judge is not None:
            judge(counts)
        self._aliases = dict(added.aliases)
        self._count += 1
        if replacing:
            self._count, evicted = 1, ()
        # Fused only when the re-sum after it leaves most of the sum as it is: with exact_sum_every=1
        # every element is rebuilt after the subtraction, and the drift must see the rebuilt sum.
        fusable = len(evicted) == 1 and self.exact_sum_every != 1
        fused = drift if fusable else None
        for load in evicted:
            try:
                self._subtract(load(), added, fused)
            except Exception as error:
                # An evicted file that cannot be read back (corrupt on disk) cannot be subtracted;
                # without this the window would stay stuck on it. The exact path needs only the window.
                if window is None:
                    raise
                logger.warning("could not read back an evicted snapshot (%s); re-summing the window", error)
                self.reset(window(), aliases=added.aliases)
                return
            self._count -= 1
        self._stale = False
        if window is not None and self.exact_sum_every is not None:
            self._rebuild_next_slices(window, added.aliases)

    def _add(self, added: CapturedState, *, replace: bool = False) -> dict[str, int]:
        """Add ``added``'s floating tensors into the sum, checking each slice for NaN and infinity just
        before it is added; returns the non-finite counts (tensors holding some). A tensor holding some
        is taken from the newest snapshot from then on (``_held``). ``replace``: the sum becomes ``added``
        (every snapshot it held is leaving)."""
        counts: dict[str, int] = {}
        for name, tensor in added.tensors.items():
            if not tensor.is_floating_point() or name in self._held:
                # A copy: a snapshot taken from a GPU lives in pinned buffers the next snapshot reuses.
                self._newest[name] = tensor.clone()
                if tensor.is_floating_point() and (count := _non_finite_count(tensor)):
                    counts[name] = count
                continue
            total = self._sum.get(name)
            fresh = total is None or replace
            if total is None:
                total = torch.empty(tensor.shape, dtype=self.accumulator_dtype)
            flat_total, flat = total.view(-1), tensor.reshape(-1)
            wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            suspect = False
            for begin in range(0, flat_total.numel(), _SLICE_ELEMENTS):
                end = begin + _SLICE_ELEMENTS
                piece = flat[begin:end]
                # A sum is finite unless an element is not (or the sum overflows: counted exactly below).
                if not suspect and not math.isfinite(float(piece.sum(dtype=wide))):
                    suspect = True
                if fresh:
                    flat_total[begin:end].copy_(piece)
                else:
                    flat_total[begin:end].add_(piece)
            count = _non_finite_count(tensor) if suspect else 0
            if count:
                # A causal mask of -inf cannot be averaged by adding and subtracting (-inf - -inf is NaN):
                # it is taken from the newest snapshot until the next full re-sum finds it finite.
                counts[name] = count
                self._held.add(name)
                self._sum.pop(name, None)
                self._newest[name] = tensor.clone()
                self._slices, self._cursor = None, 0
            elif fresh:
                self._sum[name] = total
                self._dtypes[name] = tensor.dtype
        return counts

    def _subtract(
        self, old: Mapping[str, torch.Tensor], added: CapturedState, drift: DriftRequest | None
    ) -> None:
        """Subtract an evicted snapshot: streamed (read once, verified by that read) when it can be, and
        then, if asked, with the added snapshot's drift measured piece by piece in the same pass."""
        pieces = getattr(old, "pieces", None)
        if pieces is None:
            tensors = old.tensors if isinstance(old, CapturedState) else old
            for name, total in self._sum.items():
                _in_slices(total, tensors[name], torch.Tensor.sub_)
            return
        previous = _PieceReader.of(drift.previous, old) if drift is not None else None
        sums = None
        if drift is not None and previous is not None:
            sums = DriftSums(self._count - 1, with_previous=drift.previous is not None)
        covered = dict.fromkeys(self._sum, 0)
        for name, first, values in pieces():
            if name not in self._sum:
                continue
            if not values.dtype.is_floating_point:
                raise ValueError(f"the evicted snapshot's {name!r} is {values.dtype}, not floating")
            count = values.numel()
            target = self._sum[name].view(-1)[first : first + count]
            _in_slices(target, values, torch.Tensor.sub_)
            covered[name] += count
            if sums is not None and previous is not None:
                try:
                    current = added.tensors[name].reshape(-1)[first : first + count]
                    sums.add(current, previous.read(name, first, count, values), target)
                except Exception as error:  # the drift is measured apart (and its failure reported) instead
                    logger.debug("fused drift measurement given up: %s", error)
                    sums = None
        short = [name for name, total in self._sum.items() if covered[name] != total.numel()]
        if short:
            raise ValueError(f"the evicted snapshot does not hold the window's {short[:5]} in full")
        if drift is not None and sums is not None:
            drift.sums = sums.result()

    def _rebuild_next_slices(
        self, window: Callable[[], Sequence[Mapping[str, torch.Tensor]]], aliases: Mapping[str, str]
    ) -> None:
        """Rebuild the next ``1/exact_sum_every`` of the sum's elements exactly (float64) from the window."""
        if self._slices is None:
            self._slices = _row_slices({name: total.shape for name, total in self._sum.items()})
        if not self._slices:
            return
        sources = window()
        if len(sources) != self._count:
            # The window lost a snapshot while loading (a file found corrupt): the sum still holds it.
            self.reset(sources, aliases=aliases)
            return
        total_elements = sum(total.numel() for total in self._sum.values())
        quota = -(
            -total_elements // self.exact_sum_every
        )  # ceil: exact_sum_every updates cover every element
        covered = 0
        while covered < quota:
            name, first_row, last_row, start, stop = self._slices[self._cursor]
            self._cursor = (self._cursor + 1) % len(self._slices)
            self._sum[name].view(-1)[start:stop].copy_(_exact_sum(sources, name, first_row, last_row))
            covered += stop - start

    @torch.no_grad()
    def drift_sums(
        self, current: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, float | None, float]:
        """``(‖current‖², ‖current − previous‖², ‖current − mean‖²)`` over the tensors this average sums.

        Meant for the snapshot just added (``current``, the tensors as stored) and the one before it
        (``previous``, usually a file of the buffer, read a slice of rows at a time): the sums behind
        ``diagnostics.WeightDrift``. The norms run over every tensor the running sum holds, as one
        vector: the floating tensors, each distinct tensor once (ties are aliases), without those this
        average takes from the newest snapshot for holding NaN or infinity (a ``-inf`` mask), which would
        make every norm infinite. The mean is the running sum divided by :attr:`count`, as evaluated.

        One pass over each of ``current``, ``previous`` and the sum, in blocks of ``_DRIFT_BLOCK``
        elements: the differences are taken elementwise in float32 (float64 when a tensor or the sum
        is), exact for bfloat16 and float16 snapshots and one rounding for float32 ones; each block's
        sum of squares (float32, cascade-summed) is added into a float64 total. Against float64
        throughout, the sums differ by about 1e-7 relative, below what the float32 running sum itself
        carries. ``mean − current`` is taken as ``(sum − count·current) / count`` so that no block is
        divided. The second value is None when ``previous`` is.

        >>> average = WindowAverage()
        >>> before = CapturedState({"w": torch.tensor([3.0, 0.0])})
        >>> now = CapturedState({"w": torch.tensor([3.0, 4.0])})
        >>> average.update(before)
        >>> average.update(now)
        >>> average.drift_sums(now, before)  # mean [3, 2]: 3² + 4², 4², 2²
        (25.0, 16.0, 4.0)

        Raises:
            RuntimeError: the average holds no snapshot.
            KeyError: ``current`` or ``previous`` lacks a tensor the sum holds.
            ValueError: a tensor of ``current`` or ``previous`` whose size differs from the sum's.
        """
        if self._count == 0:
            raise RuntimeError("the window average holds no snapshot yet")
        sums = DriftSums(self._count, with_previous=previous is not None)
        for name, total in self._sum.items():
            tensor = current[name]
            if tensor.numel() != total.numel():
                raise ValueError(
                    f"{name!r} has {tensor.numel()} elements in the current state, the sum {total.numel()}"
                )
            flat, flat_total = tensor.reshape(-1), total.view(-1)
            for _, first_row, last_row, start, stop in _row_slices({name: total.shape}):
                rows = None if previous is None else _read_rows(previous, name, first_row, last_row)
                if rows is not None and rows.numel() != stop - start:
                    raise ValueError(
                        f"{name!r} rows {first_row}:{last_row} hold {rows.numel()} elements in the previous "
                        f"state, {stop - start} in the current one"
                    )
                sums.add(flat[start:stop], rows, flat_total[start:stop])
        return sums.result()

    def reset(
        self, sources: Sequence[Mapping[str, torch.Tensor]], aliases: Mapping[str, str] | None = None
    ) -> None:
        """Rebuild the sum exactly from ``sources`` (oldest first): float64, a slice of a tensor at a time.

        The float64 partial sums cover about ``_SLICE_ELEMENTS`` elements (whole rows) at a time and land
        in the existing accumulator tensors, so a re-sum allocates almost nothing: rebuilding into fresh
        tensors, with a float64 copy of the largest tensor beside them, left about 1.5 snapshots' worth
        of freed memory resident in the writer thread's heap (benchmarks/RESULTS.md, item 7).
        """
        previous = self._sum
        self._sum, self._newest, self._dtypes, self._held = {}, {}, {}, set()
        self._count = len(sources)
        self._slices, self._cursor = None, 0
        self._stale = False
        self._aliases = dict(aliases or {})
        if not sources:
            return
        newest = sources[-1]
        names = _canonical_names(newest)
        for index, source in enumerate(sources[:-1]):
            other = _canonical_names(source)
            if set(other) != set(names):
                raise ValueError(_key_mismatch(f"window snapshot {index}", other, names))
        for name in names:
            reference = newest[name]
            if not reference.is_floating_point():
                self._newest[name] = reference.clone()
                continue
            shape, self._dtypes[name] = reference.shape, reference.dtype
            del reference  # a file-backed source keeps its pages mapped while a tensor of it lives
            total = previous.pop(name, None)
            if total is None or total.shape != shape or total.dtype != self.accumulator_dtype:
                total = torch.empty(shape, dtype=self.accumulator_dtype)
            for _, first_row, last_row, start, stop in _row_slices({name: shape}):
                total.view(-1)[start:stop].copy_(_exact_sum(sources, name, first_row, last_row))
            if not bool(torch.isfinite(total).all()):
                self._held.add(name)  # NaN/inf in some snapshot of the window: the newest one's values
                self._newest[name] = newest[name].clone()
                continue
            self._sum[name] = total

    def mean(self, dtype: torch.dtype | Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """The averaged state dict (aliases included, tied to their canonical tensor).

        Floating tensors come back in ``dtype`` (one dtype, or a dtype per name) if given, else in the
        dtype they were pushed in (the storage dtype, when one is set).
        """
        return self.captured(dtype).full()

    def captured(self, dtype: torch.dtype | Mapping[str, torch.dtype] | None = None) -> CapturedState:
        """The average as a ``CapturedState``: each distinct tensor once, ties as aliases."""
        if self._count == 0:
            raise RuntimeError("the window average holds no snapshot yet")
        tensors: dict[str, torch.Tensor] = {}
        for name, total in self._sum.items():
            wanted = dtype.get(name) if isinstance(dtype, Mapping) else dtype
            tensors[name] = (total / self._count).to(wanted or self._dtypes[name])
        for name, tensor in self._newest.items():
            wanted = dtype.get(name) if isinstance(dtype, Mapping) else dtype
            held = name in self._held and wanted is not None
            tensors[name] = tensor.to(wanted) if held else tensor
        return CapturedState(tensors, dict(self._aliases))

    @torch.no_grad()
    def copy_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Write the average into live tensors in place, one tensor at a time (no full extra copy)."""
        if self._count == 0:
            raise RuntimeError("the window average holds no snapshot yet")
        missing = [n for n in targets if self._aliases.get(n, n) not in self._sum and n not in self._newest]
        if missing:
            raise KeyError(f"the window average has no tensor for model entries: {missing[:5]}")
        for name, target in targets.items():
            canonical = self._aliases.get(name, name)
            if canonical not in self._sum:
                copy_into_tensor(name, target, self._newest[canonical])
            elif target.device == self._sum[canonical].device and is_plain_layout(target):
                # Divided straight into the live tensor: no temporary the size of the tensor, one pass
                # over memory instead of two. Bit-identical to dividing and then casting.
                torch.div(self._sum[canonical], self._count, out=target)
            else:
                copy_into_tensor(name, target, self._sum[canonical] / self._count)

    def mismatch(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """Why a state dict (aliases included) cannot join this window, or None if it can."""
        if self._count == 0:
            return None
        known = set(self._sum) | set(self._newest) | set(self._aliases)
        if set(tensors) != known:
            return _key_mismatch("the model's state dict", list(tensors), sorted(known))
        for name, total in self._sum.items():
            if tuple(tensors[name].shape) != tuple(total.shape):
                shape = tuple(tensors[name].shape)
                return f"the model's {name!r} has shape {shape}, the window's {tuple(total.shape)}"
        return None

    def _check_keys(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self._count == 0:
            return
        known = set(self._sum) | set(self._newest)
        if set(tensors) != known:
            raise ValueError(_key_mismatch("the new snapshot", list(tensors), sorted(known)))
        for name, total in self._sum.items():
            if tuple(tensors[name].shape) != tuple(total.shape):
                raise ValueError(
                    f"the new snapshot's {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"the window's has {tuple(total.shape)}"
                )


class DriftSums:
    """The sums of squares behind a weight drift, ``(‖current‖², ‖current − previous‖², ‖current − mean‖²)``,
    accumulated over pieces of the tensors in any order (``WindowAverage.drift_sums`` goes tensor by
    tensor; the update that subtracts an evicted file goes through it in file order).

    Each piece is cut in blocks of ``_DRIFT_BLOCK`` elements: the differences are taken elementwise in
    float32 (float64 when a tensor or the sum is), exact for bfloat16 and float16 snapshots and one
    rounding for float32 ones; each block's sum of squares is added into a float64 total. ``mean −
    current`` is taken as ``(sum − count·current) / count`` so that no block is divided.
    """

    def __init__(self, count: int, *, with_previous: bool):
        self.count = count
        self.current = 0.0
        self.previous: float | None = 0.0 if with_previous else None
        self.average = 0.0
        self._scratch: dict[
            tuple[torch.dtype, bool], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]
        ] = {}

    @torch.no_grad()
    def add(self, current: torch.Tensor, previous: torch.Tensor | None, total: torch.Tensor) -> None:
        """Add one piece: flat, equally long pieces of the current tensor, the previous one (None when
        there is no previous snapshot) and the running sum. None of them is written to."""
        wide = torch.promote_types(torch.promote_types(current.dtype, total.dtype), torch.float32)
        widened, difference, squares = self._blocks(wide, current.dtype != wide)
        for begin in range(0, current.numel(), _DRIFT_BLOCK):
            end = min(begin + _DRIFT_BLOCK, current.numel())
            block = current[begin:end]
            if widened is not None:
                # A bfloat16 block widened before any arithmetic (bfloat16 minus bfloat16 is rounded).
                block = widened[: end - begin].copy_(block)
            scratch = squares[: end - begin]
            self.current += _sum_of_squares(block, scratch)
            out = difference[: end - begin]
            if previous is not None and self.previous is not None:
                torch.sub(block, previous[begin:end], out=out)
                self.previous += _sum_of_squares(out, scratch)
            torch.sub(total[begin:end], block, alpha=self.count, out=out)
            self.average += _sum_of_squares(out, scratch)

    def result(self) -> tuple[float, float | None, float]:
        return self.current, self.previous, self.average / self.count**2

    def _blocks(
        self, wide: torch.dtype, widen: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        key = (wide, widen)
        if key not in self._scratch:
            widened = torch.empty(_DRIFT_BLOCK, dtype=wide) if widen else None
            self._scratch[key] = (
                widened,
                torch.empty(_DRIFT_BLOCK, dtype=wide),
                torch.empty(_DRIFT_BLOCK, dtype=wide),
            )
        return self._scratch[key]


class DriftRequest:
    """Asks :meth:`WindowAverage.update` to measure the drift of the snapshot it adds in the same pass that
    subtracts the evicted one, reading each piece of ``previous`` there: the current tensors and the sum
    are then in the cache already, and are not read again by a pass of their own.

    ``sums`` holds the result when the update could do it (one evicted snapshot, streamed, and no re-sum
    on the way); None otherwise, and the caller measures with :meth:`WindowAverage.drift_sums`.
    """

    def __init__(self, previous: Mapping[str, torch.Tensor] | None):
        self.previous = previous
        self.sums: tuple[float, float | None, float] | None = None


class _PieceReader:
    """Pieces of the previous snapshot matching the pieces of the evicted one, for a fused drift."""

    def __init__(self, source: Mapping[str, torch.Tensor] | None, evicted: object):
        self.source = source
        self.evicted = evicted
        self._scratch = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def of(cls, source: Mapping[str, torch.Tensor] | None, evicted: object) -> _PieceReader | None:
        """A reader, or None when ``source`` cannot be read by element ranges (then no fused drift)."""
        if source is None or source is evicted or isinstance(source, CapturedState):
            return cls(source, evicted)
        if hasattr(source, "read_elements"):
            return cls(source, evicted)
        return None

    def read(self, name: str, first: int, count: int, evicted_piece: torch.Tensor) -> torch.Tensor | None:
        source = self.source
        if source is None:
            return None
        if source is self.evicted:  # a window of one: the previous snapshot is the one leaving
            return evicted_piece
        if isinstance(source, CapturedState):
            return source[name].reshape(-1)[first : first + count]
        piece, self._scratch = source.read_elements(name, first, count, self._scratch)  # type: ignore[attr-defined]
        return piece


def _non_finite_count(tensor: torch.Tensor) -> int:
    return tensor.numel() - int(torch.isfinite(tensor).sum())


def _sum_of_squares(block: torch.Tensor, scratch: torch.Tensor) -> float:
    """The sum of the squares of a 1-d block (``scratch``: as long, same dtype), as a float64 number.

    Squared into ``scratch`` and summed by ``Tensor.sum``, whose cascade summation rounds at about
    1e-7 relative even when every element is the same (a uniform shift of a tensor); ``torch.dot``'s
    running float32 sums were off by 5e-6 on 64K equal elements.
    """
    value = float(torch.mul(block, block, out=scratch).sum())
    if math.isinf(value) and block.dtype != torch.float64:
        # float32 squares overflow past about 1.8e19 (a finite mask of finfo(float32).min); float64's do not.
        wide = block.to(torch.float64)
        value = float(torch.dot(wide, wide))
    return value


def _row_slices(shapes: Mapping[str, torch.Size]) -> list[tuple[str, int, int, int, int]]:
    """The rolling re-sum's units: ``(name, first row, last row, first element, last element)``, about
    ``_SLICE_ELEMENTS`` elements each, cut along the first dimension so that a file can serve one with
    ``get_slice``, reading those rows only. A 0-d tensor is one unit."""
    slices = []
    for name, shape in shapes.items():
        if len(shape) == 0:
            slices.append((name, 0, 0, 0, 1))
            continue
        row = shape[1:].numel()
        slices.extend(
            (name, first, last, first * row, last * row) for first, last in row_blocks(shape, _SLICE_ELEMENTS)
        )
    return slices


def _exact_sum(sources: Sequence[Mapping], name: str, first: int, last: int) -> torch.Tensor:
    """Rows ``first:last`` of tensor ``name`` summed over ``sources`` in float64, flattened.

    The same summation as ``checkpoint-stability average`` (``exact_sums.exact_sum``); only the reading
    differs: a snapshot file is opened afresh for every piece (``LazySnapshot.read_rows``), because this
    runs for the whole of training and a kept-open handle keeps every page it served resident
    (benchmarks/RESULTS.md, item 7).
    """
    return exact_sum(_read_rows(source, name, first, last) for source in sources).total


def _read_rows(source: Mapping, name: str, first: int, last: int) -> torch.Tensor:
    """Rows ``first:last`` of tensor ``name`` of a snapshot, flattened (the whole of a 0-d tensor)."""
    read_rows = getattr(source, "read_rows", None)
    if read_rows is not None:
        return read_rows(name, first, last)
    tensor = source[name]
    return (tensor if tensor.dim() == 0 else tensor[first:last]).reshape(-1)


def _canonical_names(source: Mapping) -> list[str]:
    if isinstance(source, CapturedState):
        return list(source.tensors)
    canonical = getattr(source, "canonical_keys", None)
    return list(canonical()) if canonical else list(source)


def _key_mismatch(what: str, got: Sequence[str], expected: Sequence[str]) -> str:
    extra = sorted(set(got) - set(expected))[:5]
    missing = sorted(set(expected) - set(got))[:5]
    return (
        f"{what} does not match the other snapshots' state-dict keys "
        f"(unexpected: {extra}, missing: {missing}); was the model changed mid-run?"
    )
