"""checkpoint-stability: trustworthy downstream evaluation during LLM pretraining.

Evaluate the live model, the uniform average of the last ``window`` snapshots and the ensemble of
their predictions side by side at every snapshot, and track how steady each is (MTV, IS).
The framework-free entry point is :class:`StabilityMonitor`; the Lightning and Hugging Face callbacks
live in :mod:`checkpoint_stability.callbacks`. This namespace holds the user API only; the pieces
behind it stay importable from their modules (see docs/ARCHITECTURE.md).
"""

from checkpoint_stability import _moved
from checkpoint_stability._version import __version__ as __version__
from checkpoint_stability.buffer import SnapshotError
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.evaluation import DefaultTaskError
from checkpoint_stability.evaluator import BackgroundEvaluator, FollowResult
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.run_directory import ExistingRunError
from checkpoint_stability.selection import best_model_path, load_best, read_best
from checkpoint_stability.storage.export import load_export
from checkpoint_stability.storage.run_lock import RunDirectoryLocked
from checkpoint_stability.tasks import (
    ClassificationTask,
    FunctionTask,
    GenerationTask,
    LmEvalTask,
    MultipleChoiceTask,
    NextTokenTask,
    Task,
    TaskResult,
)

__all__ = [
    "BackgroundEvaluator",
    "CheckpointStabilityError",
    "ClassificationTask",
    "DefaultTaskError",
    "ExistingRunError",
    "FollowResult",
    "FunctionTask",
    "GenerationTask",
    "LmEvalTask",
    "MultipleChoiceTask",
    "NextTokenTask",
    "RunDirectoryLocked",
    "SnapshotError",
    "StabilityConfig",
    "StabilityMonitor",
    "Task",
    "TaskResult",
    "best_model_path",
    "load_best",
    "load_export",
    "read_best",
    "write_report",
]

_moved.install()


def __getattr__(name: str):
    # The report writer pulls in the reporting layer (and matplotlib when it draws): only when asked.
    if name == "write_report":
        from checkpoint_stability.reporting.report import write_report

        return write_report
    return _moved.moved_name(name)


def __dir__() -> list[str]:
    return sorted([*globals(), "write_report"])
