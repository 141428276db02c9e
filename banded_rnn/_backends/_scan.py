"""One layer's recurrence as a ``jax.lax.scan`` that XLA compiles: every
platform and dtype, any activations, and forward-mode derivatives."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .._cell import LayerWeights, lstm_gates

FUSED_MAX_BYTES = 1 << 20
"""A layer whose weights take at most this many bytes runs one matmul of
``[x, h]`` with ``[kernel; recurrent_kernel]`` per step, stacked once per call;
a larger one runs ``x @ kernel + h @ recurrent_kernel``. The choice depends on
the layer's shapes and dtype only, never on the chunk length: the two formulas
round differently, and one formula per layer keeps chunked runs equal to whole
runs bit for bit (docs/guides/performance.md; benchmarks/NOTES.md, entries 3
and 12)."""

Gates = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""``lstm_gates`` with the layer's activations bound."""


def _time_step(
    project: Callable[[jax.Array, jax.Array], jax.Array],
    recurrent_mask: jax.Array | None,
    gates: Gates,
    carry: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array | None],
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One time step for every (sequence, band) at once: ``[batch, bands, ...]``.
    An invalid step leaves the state as it was and outputs its hidden state."""
    hidden, cell = carry
    inputs, valid = xs
    dropped = hidden if recurrent_mask is None else hidden * recurrent_mask
    preactivations = checkpoint_name(project(inputs, dropped), "preactivations")
    new_hidden, new_cell = gates(preactivations, cell)
    if valid is not None:
        valid = valid[..., None]
        new_hidden = jnp.where(valid, new_hidden, hidden)
        new_cell = jnp.where(valid, new_cell, cell)
    return (new_hidden, new_cell), new_hidden


def scan_layer(
    weights: LayerWeights,
    recurrent_mask: jax.Array | None,
    carry: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array | None],
    *,
    unroll: int | bool = 1,
    gates: Gates = lstm_gates,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """Scans one layer over ``xs = (inputs [time, batch, bands, features], valid
    [time, batch, bands] or None)`` from ``carry = (h, c)``; returns ``((h, c),
    outputs [time, batch, bands, units])``.

    The ``[batch, bands]`` axes are kept rather than flattened, and the input
    projection stays inside the loop; for the backward pass each step keeps
    only its gate pre-activations and the carry, and the gate maths is
    recomputed from them (the measurements behind each choice: NOTES entries
    2, 5 and 8).
    """
    kernel, recurrent_kernel, bias = weights
    bias = bias.reshape((1,) * (xs[0].ndim - 2) + bias.shape)
    if (kernel.size + recurrent_kernel.size) * kernel.dtype.itemsize <= FUSED_MAX_BYTES:
        stacked = jnp.concatenate([kernel, recurrent_kernel], axis=0)  # [features + units, 4u]

        def project(x, h):
            return jnp.concatenate([x, h], axis=-1) @ stacked + bias
    else:

        def project(x, h):
            return x @ kernel + h @ recurrent_kernel + bias

    step = jax.checkpoint(
        partial(_time_step, project, recurrent_mask, gates),
        policy=jax.checkpoint_policies.save_only_these_names("preactivations"),
        prevent_cse=False,  # the scan already keeps XLA from merging steps
    )
    return jax.lax.scan(step, carry, xs, unroll=unroll)
