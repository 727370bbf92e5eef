"""benchmarks/run.py --quick end to end: every benchmark still runs and RESULTS.md holds every item.

No timing is asserted (the figures of a quick run on tiny models mean little); this keeps `make bench`
from breaking unnoticed when the library changes under it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_run_writes_every_item(tmp_path):
    output = tmp_path / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = output.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| ", line)]
    items = {row.split("|")[1].strip() for row in rows}
    assert items == {str(i) for i in range(1, 11)}, items
    for row in rows:
        value = row.split("|")[3].strip().rstrip("%").split()[0]
        assert math.isfinite(float(value)), row
    assert "## Targets missed in this run" in text
    assert "Quick smoke run" in text
