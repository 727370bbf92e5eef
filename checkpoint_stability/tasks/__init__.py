"""Downstream tasks: the Task protocol, TaskResult, and the task types.

``LmEvalTask`` imports lm-evaluation-harness only when one is built (optional extra ``lm-eval``).
"""

from checkpoint_stability.tasks.base import Task, TaskResult, validate_task_name, validate_tasks
from checkpoint_stability.tasks.classification import ClassificationTask
from checkpoint_stability.tasks.from_dataloader import task_from_dataloader
from checkpoint_stability.tasks.function import FunctionTask
from checkpoint_stability.tasks.generation import GenerationTask, default_normalize
from checkpoint_stability.tasks.lm_eval import LmEvalTask
from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask
from checkpoint_stability.tasks.next_token import NextTokenTask

__all__ = [
    "ClassificationTask",
    "FunctionTask",
    "GenerationTask",
    "LmEvalTask",
    "MultipleChoiceTask",
    "NextTokenTask",
    "Task",
    "TaskResult",
    "default_normalize",
    "task_from_dataloader",
    "validate_task_name",
    "validate_tasks",
]
