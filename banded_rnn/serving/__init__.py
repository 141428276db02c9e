"""Serving many live sequences at once.

:class:`SequenceBatcher` runs the frames of many sequences, each in a slot of
a fixed batch, as one compiled call per tick.
"""

from ._batcher import SequenceBatcher as SequenceBatcher
from ._sequences import BatcherFullError as BatcherFullError

__all__ = ["BatcherFullError", "SequenceBatcher"]
