"""Report sink: the run's ``report/report.md`` and its plots, written once when the run ends."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


class ReportSink:
    """Write the stability report of a run directory when the run ends (``report=True``).

    The monitor calls :meth:`run_ended` once, at ``close()`` after a run that finished (not after
    ``abandon()``, nor when it reopens to resume). The reporting layer (matplotlib, the ``report``
    extra) is imported only then, so the live core never imports it; without matplotlib the run ends
    with a warning instead of a report.

    Example::

        sink = ReportSink("runs/exp/stability")
        ...                       # the monitor calls sink.write(step, records) at every snapshot
        sink.run_ended()          # -> runs/exp/stability/report/report.md
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def write(self, step: int, records: list[dict]) -> None:
        """Nothing to do per snapshot: the report reads the run directory at the end."""

    def close(self) -> None:
        """Nothing to release."""

    def run_ended(self) -> Path | None:
        """Write the report; returns its path (None when the reporting extra is not installed)."""
        try:
            from checkpoint_stability.reporting.report import write_report

            path = write_report(self.run_dir)
        except ImportError as error:  # matplotlib, an optional extra: say how to get it
            logger.warning("no stability report at the end of training: %s", error)
            return None
        logger.info("stability report: %s", path)
        return path
