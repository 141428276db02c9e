"""Streaming inference: a model run chunk by chunk with its state carried.

:mod:`._step` is the pure step (``stream_step``, ``stream_apply``, the stream's
spec), :mod:`._stream` the stateful ``Stream`` over it, :mod:`._file` its
state files, :mod:`._export` the step as a ``jax.export`` artifact, and
:mod:`._compile_count` counts the compilations a stream causes.
"""

from ._export import export_stream_step as export_stream_step
from ._step import stream_step as stream_step
from ._stream import Stream as Stream

__all__ = ["Stream", "export_stream_step", "stream_step"]
