"""gradwatch: watch gradient flow while a network trains, and act on it.

The core imports no framework; the adapters live in ``gradwatch.integrations``.
"""

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.grouping import Grouping
from gradwatch.record import Histogram, Record
from gradwatch.sinks import MemorySink, TensorBoardSink

__version__ = "0.2.0.dev0"

__all__ = [
    "Cadence",
    "Grouping",
    "Histogram",
    "MemorySink",
    "Record",
    "TensorBoardSink",
    "tags",
]
