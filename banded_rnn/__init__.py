"""banded_rnn: one shared LSTM over many parallel bands, with explicit per-band state.

``BandedLSTM`` scans a shared LSTM over time for every band of an input
``[batch, bands, time, features]``; the state, a tuple of ``LSTMState`` (one
per layer), goes in and comes out explicitly, so chunked runs equal whole runs
and bands never interact.
"""

from ._backends._native import info as kernel_info
from ._backends._native import set_threads as set_kernel_threads
from ._banded import BandedLSTM as BandedLSTM
from ._cell import lstm_gates as lstm_gates
from ._state import LSTMState as LSTMState
from ._state import State as State
from ._streaming import Stream as Stream
from ._streaming import export_onnx as export_onnx
from ._streaming import export_stream_step as export_stream_step
from ._streaming import stream_step as stream_step

__all__ = ["BandedLSTM", "LSTMState", "State", "lstm_gates"]
__all__ += ["Stream", "export_onnx", "export_stream_step", "stream_step"]
__all__ += ["kernel_info", "set_kernel_threads"]
__version__ = "0.1.0"
