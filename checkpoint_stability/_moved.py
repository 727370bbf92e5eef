"""Deprecated names, kept for one release: modules that moved into the package's layers, and internals
that left the top-level namespace. Each use warns (``DeprecationWarning``) with the new name.

Delete this file, and its import in ``__init__.py``, in the release after 0.2.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "checkpoint_stability.analysis": "checkpoint_stability.offline.analysis",
    "checkpoint_stability.atomic_files": "checkpoint_stability.storage.atomic_files",
    "checkpoint_stability.checkpoint_files": "checkpoint_stability.storage.checkpoint_files",
    "checkpoint_stability.cli": "checkpoint_stability.offline.cli",
    "checkpoint_stability.defaults": "checkpoint_stability.tasks.from_dataloader",
    "checkpoint_stability.export": "checkpoint_stability.storage.export",
    "checkpoint_stability.report": "checkpoint_stability.reporting.report",
    "checkpoint_stability.report_plots": "checkpoint_stability.reporting.plots",
    "checkpoint_stability.run_lock": "checkpoint_stability.storage.run_lock",
    "checkpoint_stability.state": "checkpoint_stability.state_dicts",
    "checkpoint_stability.summary": "checkpoint_stability.reporting.summary",
}
"""Old module path -> where it lives now."""

MOVED_NAMES = {
    "CorruptSnapshotError": "checkpoint_stability.buffer",
    "History": "checkpoint_stability.history",
    "Runtime": "checkpoint_stability.runtime",
    "SnapshotBuffer": "checkpoint_stability.buffer",
    "TorchDistributedRuntime": "checkpoint_stability.runtime",
    "WindowAverage": "checkpoint_stability.averaging",
    "char_f1": "checkpoint_stability.metrics",
    "combine": "checkpoint_stability.ensemble",
    "instability_score": "checkpoint_stability.metrics",
    "mean_prob": "checkpoint_stability.ensemble",
    "mean_total_variation": "checkpoint_stability.metrics",
    "vote": "checkpoint_stability.ensemble",
}
"""Names that ``checkpoint_stability`` exported before 0.2 and that now live only in their module."""


def moved_name(name: str):
    """The object a deprecated top-level name stands for, with a warning; AttributeError otherwise."""
    module = MOVED_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'checkpoint_stability' has no attribute {name!r}")
    warnings.warn(
        f"checkpoint_stability.{name} is deprecated; import it from {module}",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(module), name)


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.target}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)  # the module itself: one object under both names

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new = MOVED_MODULES.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Let the old module paths import (once per process)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
