"""``export_stream_step``: the compiled streaming step as a serialised StableHLO artifact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .. import _validate
from .._backends import scan_only
from ._step import stream_apply, stream_spec


def export_stream_step(
    model: nn.Module,
    variables: Any,
    batch_size: int,
    num_bands: int,
    chunk_length: int,
    *,
    dtype: Any = np.float32,
    features: int | None = None,
    platforms: Sequence[str] | None = None,
) -> bytes:
    """Serialises the streaming step for one chunk length with ``jax.export``.

    The variables are baked into the artifact as constants: it is
    self-contained, and a process that loads it needs nothing but jax and
    numpy (no flax, no banded_rnn, no model code, no parameter file). Export
    again after the weights change. The state is flat, so that the artifact's
    signature holds plain arrays only::

        exported = jax.export.deserialize(blob)
        state = tuple(np.zeros(a.shape, a.dtype) for a in exported.in_avals[:-2])
        state, outputs = exported.call(state, chunk, reset)

    with ``state`` the leaves of the model's state in ``jax.tree`` order (for
    a ``BandedLSTM``, ``(hidden_0, cell_0, hidden_1, cell_1, ...)``, each
    ``[batch, bands, units]`` float32); ``chunk [batch, bands, chunk_length,
    features]`` of ``dtype``; ``reset`` a bool mask ``[batch, bands]`` zeroing
    those states before the chunk; ``outputs [batch, bands, chunk_length,
    ...]``. The state is not donated (``jax.export`` has no donation). Every
    ``BandedLSTM`` in the artifact runs the XLA scan, never the native CPU
    kernel, so loading it needs nothing but JAX.

    Args:
      model: the ``BandedLSTM``, or a Flax module with its calling convention
        (see :class:`Stream`).
      variables: its variables, baked in.
      batch_size, num_bands: the ``[batch, bands]`` of the state.
      chunk_length: the time steps per call the artifact runs.
      dtype: the chunk's floating dtype.
      features: the chunk's last axis; read from a ``BandedLSTM``'s
        variables, required for other models.
      platforms: the platforms to lower for, e.g. ``("cpu", "cuda")``; by
        default the current backend.

    Returns:
      The serialised artifact (``bytes``), which ``jax.export.deserialize`` loads.

    >>> import jax, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(8)
    >>> variables = model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
    >>> blob = export_stream_step(model, variables, batch_size=1, num_bands=3, chunk_length=1)
    >>> step = jax.export.deserialize(blob)             # needs only jax, elsewhere
    >>> state = tuple(np.zeros(a.shape, a.dtype) for a in step.in_avals[:-2])  # hidden, cell
    >>> chunk = np.ones((1, 3, 1, 4), np.float32)      # [batch, bands, time, features]
    >>> state, y = step.call(state, chunk, np.zeros((1, 3), bool))  # no reset
    >>> y.shape                                        # [batch, bands, time, units]
    (1, 3, 1, 8)
    """
    spec = stream_spec(model, variables, batch_size, num_bands, dtype, features)
    chunk_length = _validate.positive_int(chunk_length, "chunk_length")
    variables = jax.device_put(variables)
    treedef = jax.tree.structure(spec.state)

    def flat_step(flat_state, chunk, reset):
        final_state, outputs = stream_apply(
            model, variables, jax.tree.unflatten(treedef, flat_state), chunk, reset
        )
        return tuple(jax.tree.leaves(final_state)), outputs

    shape = (spec.batch_size, spec.num_bands)
    chunk = jax.ShapeDtypeStruct((*shape, chunk_length, spec.features), spec.dtype)
    reset = jax.ShapeDtypeStruct(shape, np.bool_)
    state = tuple(jax.tree.leaves(spec.state))
    # The artifact runs the XLA scan: it then loads anywhere jax.export does,
    # with no native kernel to register, on every platform it was lowered for.
    with scan_only():
        exported = jax.export.export(jax.jit(flat_step), platforms=platforms)(state, chunk, reset)
    return bytes(exported.serialize())
