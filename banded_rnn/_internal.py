"""What the other packages of this repository (``banded_rnn.training``,
``banded_rnn.serving``, ``interop``, ``benchmarks``) may use of the core's
private modules, and nothing else: docs/guides/internals.md lists it with its
contracts, and tests/docs/test_layout.py checks that no package reaches past it.
"""

from . import _validate as validate
from ._backends._chunking import scan_chunks as scan_chunks
from ._backends._cudnn import platform_supported as cudnn_platform_supported
from ._backends._native import row_block as kernel_row_block
from ._cell import ACTIVATIONS as ACTIVATIONS
from ._demo import run_demo as run_demo
from ._init import unit_forget_bias as unit_forget_bias
from ._state import ROW_AXES as ROW_AXES
from ._state import batch_mask as batch_mask
from ._state import reset_state as reset_state
from ._streaming._compile_count import CompileCounter as CompileCounter
from ._streaming._file import write_atomically as write_atomically
from ._streaming._step import StreamSpec as StreamSpec
from ._streaming._step import stream_apply as stream_apply
from ._streaming._step import stream_spec as stream_spec
from ._streaming._step import with_packed_weights as with_packed_weights
from ._time_order import chunks_in_time_order as chunks_in_time_order
from ._time_order import forward_chunks as forward_chunks

__all__ = [
    "ACTIVATIONS",
    "CompileCounter",
    "StreamSpec",
    "ROW_AXES",
    "batch_mask",
    "chunks_in_time_order",
    "cudnn_platform_supported",
    "forward_chunks",
    "kernel_row_block",
    "reset_state",
    "run_demo",
    "scan_chunks",
    "stream_apply",
    "stream_spec",
    "unit_forget_bias",
    "validate",
    "with_packed_weights",
    "write_atomically",
]
