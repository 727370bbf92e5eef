"""Console sink: one human-readable summary line per snapshot step."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from checkpoint_stability.records import MEAN_TASK, VARIANTS

# (label on the line, record key)
_SECTIONS: tuple[tuple[str, str], ...] = (("score", "score"), ("IS", "is"), ("MTV", "mtv"))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


class ConsoleSink:
    """Print one line per step: with several tasks the ``"mean"`` records (the mean over the tasks,
    said on the line), with one task that task's records, named on the line. Variants or metrics absent
    from every record are left out; a None next to other values is shown as ``n/a``. Window size and
    model count come from the avg (else ens) record.

    Example::

        sink = ConsoleSink()
        sink.write(500, records)
        # [stability] step 500 (mean of 3 tasks) | score raw 0.412 avg 0.430 ens 0.425 | IS raw 0.210
        #   avg 0.080 ens 0.050 | MTV raw 0.031 avg 0.012 ens 0.020 (window 20, 5 models)   (one line)
    """

    def __init__(self, stream: TextIO | None = None, *, printer: Callable[[str], None] | None = None) -> None:
        """``printer``: how a line reaches the user (a framework callback passes its progress bar's
        ``print``, so the line is not glued onto the bar); else printed to ``stream``, by default
        ``sys.stdout`` at write time, so redirections made later (pytest's capsys,
        ``contextlib.redirect_stdout``) are honoured."""
        self.stream = stream
        self.printer = printer

    def format_line(self, step: int, records: list[dict]) -> str:
        """The line :meth:`write` prints for ``records``."""
        head = f"[stability] step {step}"
        if not records:
            return f"{head} | no results"
        tasks = list(dict.fromkeys(record.get("task") for record in records))
        named = [t for t in tasks if t != MEAN_TASK]
        # One task: its own records, named; several: the mean over them, said so.
        task = named[0] if len(named) == 1 or MEAN_TASK not in tasks else MEAN_TASK
        by_variant = {r.get("variant"): r for r in records if r.get("task") == task}
        present = [v for v in VARIANTS if v in by_variant]
        if task != MEAN_TASK:
            head = f"{head} ({task})"
        else:
            head = f"{head} (mean of {len(named)} tasks)" if named else f"{head} (mean over tasks)"

        parts = [head]
        for label, key in _SECTIONS:
            values = [(v, by_variant[v].get(key)) for v in present]
            if all(value is None for _, value in values):
                continue
            parts.append(" ".join([label, *(f"{v} {_fmt(value)}" for v, value in values)]))
        line = " | ".join(parts)

        window_record = by_variant.get("avg") or by_variant.get("ens")
        if window_record is not None:
            window, n_models = window_record.get("window"), window_record.get("n_models")
            extras = []
            if window is not None:
                extras.append(f"window {window}")
            if n_models is not None:
                extras.append(f"{n_models} model" + ("" if n_models == 1 else "s"))
            if extras:
                line = f"{line} ({', '.join(extras)})"
        return line

    def write(self, step: int, records: list[dict]) -> None:
        """Print the summary line of ``step``."""
        line = self.format_line(step, records)
        if self.printer is not None:
            self.printer(line)
            return
        stream = sys.stdout if self.stream is None else self.stream
        print(line, file=stream, flush=True)

    def close(self) -> None:
        """Nothing to release; the stream belongs to the caller."""
