"""Sinks: where records go."""

from gradwatch.sinks.memory import MemorySink
from gradwatch.sinks.tensorboard import TensorBoardSink

__all__ = [
    "MemorySink",
    "TensorBoardSink",
]
