"""Downstream tasks: the Task protocol, TaskResult, and the task types."""

from checkpoint_stability.tasks.base import Task, TaskResult, validate_task_name, validate_tasks
from checkpoint_stability.tasks.function import FunctionTask

__all__ = ["FunctionTask", "Task", "TaskResult", "validate_task_name", "validate_tasks"]
