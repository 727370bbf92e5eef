"""Suite-wide settings."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _train_end_report_only_where_tested(request, monkeypatch):
    """Drawing the report when a run ends costs 1-2 s on 2 cores, and most tests end a run: only the
    tests marked ``train_end_report`` let the monitor draw it. ``write_report`` itself is tested in
    test_report.py, and runs through the CLI in test_cli.py."""
    if request.node.get_closest_marker("train_end_report") is not None:
        return

    def not_drawn(sink):
        return Path(sink.run_dir) / "report" / "report.md"

    monkeypatch.setattr("checkpoint_stability.sinks.report.ReportSink.run_ended", not_drawn)
