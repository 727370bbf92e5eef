"""Framework loggers sink: the stability scalars through a training framework's own loggers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from checkpoint_stability.sinks.base import scalar_items


class FrameworkLoggersSink:
    """Log the scalars of every snapshot through loggers that take ``log_metrics(metrics, step=...)``.

    Lightning's loggers (``CSVLogger``, ``MLFlowLogger``, ``CometLogger``, ...) all have that method.
    Each gets the :func:`~checkpoint_stability.sinks.base.scalar_items` of a step with an explicit
    ``step=``, the optimizer step of the snapshot, and is then asked to ``save()`` (as Lightning does
    after logging), so a ``CSVLogger`` writes its ``metrics.csv`` at every snapshot rather than every
    ``flush_logs_every_n_steps`` steps.

    The loggers belong to the framework: :meth:`close` neither closes nor finalizes them.

    Example::

        from lightning.pytorch.loggers import CSVLogger

        sink = FrameworkLoggersSink([CSVLogger("logs")])
        sink.write(500, records)  # logs stability/<task>/<variant>/<metric> at step 500
    """

    def __init__(self, loggers: Sequence[Any]) -> None:
        if isinstance(loggers, (str, bytes)) or not isinstance(loggers, Sequence):
            raise ValueError(f"loggers must be a list of loggers, got {type(loggers).__name__}")
        for logger in loggers:
            if not callable(getattr(logger, "log_metrics", None)):
                raise ValueError(f"{type(logger).__name__} has no log_metrics(metrics, step=...) method")
        self.loggers = list(loggers)

    def write(self, step: int, records: list[dict]) -> None:
        """Log every scalar of ``records`` at ``step`` through every logger, then save each."""
        items = scalar_items(records)
        if not items:
            return
        for logger in self.loggers:
            logger.log_metrics(dict(items), step=step)
            save = getattr(logger, "save", None)
            if callable(save):
                save()

    def close(self) -> None:
        """Nothing to release: the loggers are the framework's, which finalizes them."""
