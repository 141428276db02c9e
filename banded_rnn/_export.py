"""``export_stream_step``: the compiled streaming step as a serialised StableHLO artifact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ._banded import BandedLSTM
from ._state import LSTMState
from ._stream import _check_variables, _features, _positive_int, _step


def export_stream_step(
    model: BandedLSTM,
    variables: Any,
    batch_size: int,
    num_bands: int,
    chunk: int,
    *,
    dtype: Any = np.float32,
    platforms: Sequence[str] | None = None,
) -> bytes:
    """Serialises the streaming step for one chunk length with ``jax.export``.

    The variables are baked into the artifact as constants: it is
    self-contained, and a process that loads it needs nothing but jax and
    numpy (no flax, no banded_rnn, no parameter file). Export again after the
    weights change. The state is flat, so that the artifact's signature holds
    plain arrays only::

        exported = jax.export.deserialize(blob)
        state = tuple(np.zeros((batch, bands, units), np.float32) for _ in range(2 * num_layers))
        state, outputs = exported.call(state, chunk, reset)

    with ``state = (hidden_0, cell_0, hidden_1, cell_1, ...)``, each
    ``[batch, bands, units]`` float32; ``chunk [batch, bands, chunk, features]``
    of ``dtype``; ``reset`` a bool mask ``[batch, bands]`` zeroing those
    states before the chunk; ``outputs [batch, bands, chunk, units]``. The
    state is not donated (``jax.export`` has no donation).

    Args:
      model: the ``BandedLSTM``.
      variables: its variables, baked in.
      batch_size, num_bands: the ``[batch, bands]`` of the state.
      chunk: the chunk length (time steps per call) the artifact runs.
      dtype: the chunk's floating dtype.
      platforms: the platforms to lower for, e.g. ``("cpu", "cuda")``; by
        default the current backend.

    Returns:
      The serialised artifact: ``jax.export.deserialize(blob)`` loads it.
    """
    if not isinstance(model, BandedLSTM):
        raise TypeError(f"model: expected a BandedLSTM; received {type(model).__name__}")
    batch_size = _positive_int(batch_size, "batch_size")
    num_bands = _positive_int(num_bands, "num_bands")
    chunk = _positive_int(chunk, "chunk")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype: expected a floating dtype; received {dtype}")
    features = _features(variables, model.num_layers)
    _check_variables(model, variables, features)
    variables = jax.device_put(variables)

    def flat_step(state, inputs, reset):
        layered = None
        if state is not None:
            layered = tuple(LSTMState(*state[i : i + 2]) for i in range(0, len(state), 2))
        final_state, outputs = _step(model, variables, layered, inputs, reset)
        return tuple(a for layer in final_state for a in layer), outputs

    chunk_struct = jax.ShapeDtypeStruct((batch_size, num_bands, chunk, features), dtype)
    reset_struct = jax.ShapeDtypeStruct((batch_size, num_bands), np.bool_)
    # From zeros, only for the state's shapes and dtypes; checks the variables too.
    state_struct, _ = jax.eval_shape(flat_step, None, chunk_struct, reset_struct)
    exported = jax.export.export(jax.jit(flat_step), platforms=platforms)(
        state_struct, chunk_struct, reset_struct
    )
    return bytes(exported.serialize())
