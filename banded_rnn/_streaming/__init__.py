"""Streaming inference: a model run chunk by chunk with its state carried.

:mod:`._step` is the pure step (``stream_step``, ``stream_apply``, the stream's
spec), :mod:`._stream` the stateful ``Stream`` over it, :mod:`._file` its
state files, :mod:`._export` the step as a ``jax.export`` artifact,
:mod:`._onnx` one call as an ONNX model (its LSTM layers in
:mod:`._onnx_lstm`, the rest in :mod:`._onnx_graph` with the rules of
:mod:`._onnx_rules`), and :mod:`._compile_count` counts the compilations a
stream causes.
"""

from ._export import export_stream_step as export_stream_step
from ._onnx import export_onnx as export_onnx
from ._step import stream_step as stream_step
from ._stream import Stream as Stream

__all__ = ["Stream", "export_onnx", "export_stream_step", "stream_step"]
