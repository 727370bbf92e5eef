"""Output sinks: where the per-step stability records go (TensorBoard, console, framework loggers,
W&B) and the report written when a run ends."""

from checkpoint_stability.sinks.base import Sink, scalar_items
from checkpoint_stability.sinks.console import ConsoleSink
from checkpoint_stability.sinks.framework_loggers import FrameworkLoggersSink
from checkpoint_stability.sinks.report import ReportSink
from checkpoint_stability.sinks.tensorboard import TensorBoardSink, custom_scalars_layout
from checkpoint_stability.sinks.wandb import WandbSink

__all__ = [
    "ConsoleSink",
    "FrameworkLoggersSink",
    "ReportSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "custom_scalars_layout",
    "scalar_items",
]
