"""checkpoint-stability: trustworthy downstream evaluation during LLM pretraining.

Evaluate the live model, the uniform average of the last ``window`` snapshots and the ensemble of
their predictions side by side at every snapshot, and track how steady each is (MTV, IS).
The framework-free entry point is :class:`StabilityMonitor`; the Lightning and Hugging Face callbacks
live in :mod:`checkpoint_stability.callbacks`.
"""

from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import CorruptSnapshotError, SnapshotBuffer, SnapshotError
from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.ensemble import combine, mean_prob, vote
from checkpoint_stability.history import History
from checkpoint_stability.metrics import char_f1, instability_score, mean_total_variation
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.runtime import Runtime, TorchDistributedRuntime
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

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "CorruptSnapshotError",
    "FunctionTask",
    "GenerationTask",
    "History",
    "LmEvalTask",
    "MultipleChoiceTask",
    "NextTokenTask",
    "Runtime",
    "SnapshotBuffer",
    "SnapshotError",
    "StabilityConfig",
    "StabilityMonitor",
    "Task",
    "TaskResult",
    "TorchDistributedRuntime",
    "WindowAverage",
    "char_f1",
    "combine",
    "instability_score",
    "mean_prob",
    "mean_total_variation",
    "vote",
]
