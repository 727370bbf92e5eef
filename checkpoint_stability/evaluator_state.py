"""``evaluator.json``: how far a background evaluator has got, written atomically after each snapshot it
consumed, read by the training side (which files it may delete) and by the evaluator when it restarts.

    {"consumed": 800, "window": [720, 740, 760, 780, 800], "needed_from": 720,
     "generation": 1, "pid": 4242, "time": 1733390000.0}

``consumed``: the last step whose records, examples, best model and export are written (a restart goes
on after it, dropping anything newer that a kill left half-done); ``window``: the evaluator's window of
snapshots, whose files its average reads; ``needed_from``: the oldest step it will still read (the
trainer keeps every file from there on, within ``max_pending``); ``generation``: the training side's
``run.json`` generation it has followed (a new one means the trainer resumed or started over).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkpoint_stability.storage.atomic_files import atomic_write_text
from checkpoint_stability.storage.json_files import read_json_object

logger = logging.getLogger(__name__)

EVALUATOR_FILE = "evaluator.json"


@dataclass
class EvaluatorState:
    """The contents of ``evaluator.json`` (see the module docstring)."""

    consumed: int | None = None
    window: list[int] = field(default_factory=list)
    needed_from: int | None = None
    generation: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "pid": os.getpid(), "time": time.time()}


def read_evaluator_state(run_dir: str | os.PathLike) -> EvaluatorState | None:
    """What ``evaluator.json`` says; None when there is none. A damaged file counts as none (warned):
    the evaluator then starts over, which drops and redoes its records rather than trusting them."""
    path = Path(run_dir) / EVALUATOR_FILE
    try:
        raw = read_json_object(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable %s (%s)", path, error)
        return None

    def step(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    window = raw.get("window")
    generation = raw.get("generation")
    return EvaluatorState(
        consumed=step(raw.get("consumed")),
        window=[s for s in window if step(s) is not None] if isinstance(window, list) else [],
        needed_from=step(raw.get("needed_from")),
        generation=generation if isinstance(generation, int) else 0,
    )


def write_evaluator_state(run_dir: str | os.PathLike, state: EvaluatorState) -> None:
    """Replace ``evaluator.json`` atomically (fsynced)."""
    root = Path(run_dir)
    atomic_write_text(root / EVALUATOR_FILE, json.dumps(state.to_json()) + "\n", inside=root)


def needed_from(run_dir: str | os.PathLike, generation: int | None = None) -> int | None:
    """The oldest step the evaluator still reads (None: every step). ``generation``: the training side's
    current one; an evaluator that has not followed it yet (training resumed from an earlier step) will
    go back to that step and rebuild its window from the files before it, so until it acknowledges the
    new generation every file is needed."""
    state = read_evaluator_state(run_dir)
    if state is None or (generation is not None and state.generation != generation):
        return None
    if state.needed_from is not None:
        return state.needed_from
    return None if state.consumed is None else state.consumed + 1


__all__ = ["EVALUATOR_FILE", "EvaluatorState", "needed_from", "read_evaluator_state", "write_evaluator_state"]
