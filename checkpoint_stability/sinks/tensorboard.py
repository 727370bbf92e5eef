"""TensorBoard sink: scalars under the ``stability/...`` names plus a custom-scalars layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from checkpoint_stability.sinks.base import custom_scalars_layout, layout_task_names, scalar_items
from checkpoint_stability.validation import require_int


class TensorBoardSink:
    """Write stability records as TensorBoard scalars.

    Every item of :func:`scalar_items` is logged with ``add_scalar`` at ``global_step=step``,
    and on the first write a custom-scalars layout is added so that the "Custom Scalars" tab
    shows, per task (``"mean"`` first), one chart with raw, avg and ens together for each of
    score, IS and MTV.

    Either pass ``log_dir`` and let the sink own a ``torch.utils.tensorboard.SummaryWriter``,
    created lazily on the first write (constructing a sink creates no files), or hand over an
    existing writer (anything with ``add_scalar``/``add_custom_scalars``/``flush``, e.g.
    Lightning's ``TensorBoardLogger.experiment``), which the sink uses but never closes.

    Resuming: pass ``purge_step=S + 1`` when the run resumes from a checkpoint at step ``S``.
    The new writer then starts its event file with a ``SessionLog.START`` event at that step,
    and TensorBoard's reader (``EventAccumulator`` with its default
    ``purge_orphaned_data=True``), on reaching that event, drops every point already read
    with ``step >= purge_step`` from all tags. The abandoned trajectory's points after ``S``
    therefore vanish from the charts, while everything up to and including ``S`` stays. Only
    the display is affected: the old event file is left untouched on disk. The resumed run must
    write into the same ``log_dir``.

    Example::

        sink = TensorBoardSink("runs/exp1", task_names=["hellaswag", "arc_easy"])
        sink.write(500, records)  # records: the dicts of step 500, incl. task "mean"
        sink.close()

        # after resuming from the checkpoint of step 1000:
        sink = TensorBoardSink("runs/exp1", task_names=tasks, purge_step=1001)
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None,
        *,
        task_names: Sequence[str],
        purge_step: int | None = None,
        writer: Any = None,
    ) -> None:
        if writer is None and log_dir is None:
            raise ValueError("log_dir must be a directory path when no writer is given, got None")
        if purge_step is not None:
            purge_step = require_int("purge_step", purge_step, 0, optional=True)
            # purge_step only takes effect when the SummaryWriter opens its event file, which a
            # handed-over writer has already done; accepting it would silently do nothing.
            if writer is not None:
                raise ValueError(
                    "purge_step must be None when a writer is given (set it on that writer instead), "
                    f"got {purge_step!r}"
                )
        if writer is not None:
            for method in ("add_scalar", "add_custom_scalars", "flush"):
                if not callable(getattr(writer, method, None)):
                    raise ValueError(f"writer must have a callable {method}(), got {type(writer).__name__}")

        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.task_names = layout_task_names(task_names)
        self.purge_step = purge_step
        self._writer = writer
        self._owns_writer = writer is None
        self._layout_written = False
        self._closed = False

    @property
    def writer(self) -> Any:
        """The underlying writer, or None if an owned writer has not been created yet."""
        return self._writer

    def _get_writer(self) -> Any:
        if self._writer is None:
            # Imported here so that importing the sinks package does not pull in tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, purge_step=self.purge_step)
        return self._writer

    def write(self, step: int, records: list[dict]) -> None:
        """Log all scalars of ``records`` at ``global_step=step`` and flush."""
        if self._closed:
            raise RuntimeError("TensorBoardSink.write called after close()")
        for record in records:
            if "step" in record and record["step"] != step:
                raise ValueError(
                    f"records must all be of step {step}, got a record of step {record['step']!r}"
                )
        items = scalar_items(records)
        writer = self._get_writer()
        if not self._layout_written:
            # The custom-scalars plugin reads one layout per run, so write it exactly once.
            writer.add_custom_scalars(custom_scalars_layout(self.task_names))
            self._layout_written = True
        for name, value in items.items():
            writer.add_scalar(name, value, global_step=step)
        # Results arrive once per snapshot, so flushing every write is cheap and makes them
        # visible immediately instead of after SummaryWriter's flush_secs (120 s by default).
        writer.flush()

    def close(self) -> None:
        """Close the owned writer; a handed-over writer is only flushed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()
