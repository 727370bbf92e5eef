"""Output sinks: where the per-step stability records go (TensorBoard, console, ...)."""

from checkpoint_stability.sinks.base import Sink, custom_scalars_layout, scalar_items
from checkpoint_stability.sinks.console import ConsoleSink
from checkpoint_stability.sinks.tensorboard import TensorBoardSink

__all__ = ["ConsoleSink", "Sink", "TensorBoardSink", "custom_scalars_layout", "scalar_items"]
