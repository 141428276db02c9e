"""``export_stream_step``: the compiled streaming step as a serialised StableHLO artifact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from . import _validate
from ._banded import BandedLSTM
from ._state import flatten_state, unflatten_state, zero_state
from ._stream_step import stream_apply, stream_spec


def export_stream_step(
    model: BandedLSTM,
    variables: Any,
    batch_size: int,
    num_bands: int,
    chunk_length: int,
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
    ``[batch, bands, units]`` float32; ``chunk [batch, bands, chunk_length,
    features]`` of ``dtype``; ``reset`` a bool mask ``[batch, bands]`` zeroing
    those states before the chunk; ``outputs [batch, bands, chunk_length,
    units]``. The
    state is not donated (``jax.export`` has no donation). The artifact runs
    the XLA scan, never the native CPU kernel, so loading it needs nothing
    but JAX.

    Args:
      model: the ``BandedLSTM``.
      variables: its variables, baked in.
      batch_size, num_bands: the ``[batch, bands]`` of the state.
      chunk_length: the time steps per call the artifact runs.
      dtype: the chunk's floating dtype.
      platforms: the platforms to lower for, e.g. ``("cpu", "cuda")``; by
        default the current backend.

    Returns:
      The serialised artifact: ``jax.export.deserialize(blob)`` loads it.
    """
    spec = stream_spec(model, variables, batch_size, num_bands, dtype)
    # The artifact runs the XLA scan: it then loads anywhere jax.export does,
    # with no native kernel to register, on every platform it was lowered for.
    model = model.clone(implementation="scan")
    chunk_length = _validate.positive_int(chunk_length, "chunk_length")
    variables = jax.device_put(variables)

    def flat_step(flat_state, chunk, reset):
        final_state, outputs = stream_apply(
            model, variables, unflatten_state(flat_state), chunk, reset
        )
        return flatten_state(final_state), outputs

    shape = (spec.batch_size, spec.num_bands)
    chunk = jax.ShapeDtypeStruct((*shape, chunk_length, spec.features), spec.dtype)
    reset = jax.ShapeDtypeStruct(shape, np.bool_)
    state = flatten_state(
        zero_state(model.num_layers, spec.state_shape, spec.state_dtype, jax.ShapeDtypeStruct)
    )
    exported = jax.export.export(jax.jit(flat_step), platforms=platforms)(state, chunk, reset)
    return bytes(exported.serialize())
