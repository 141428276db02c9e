"""The LSTM gate maths, written once for the whole package."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LayerWeights = tuple[jax.Array, jax.Array, jax.Array]
"""One layer's ``(kernel [features, 4 * units], recurrent_kernel [units, 4 * units],
bias [4 * units])``, the layout of ``keras.layers.LSTM``."""


def lstm_gates(preactivations: jax.Array, cell: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Applies the LSTM non-linearities to the summed gate pre-activations.

    With ``z = x @ kernel + h @ recurrent_kernel + bias`` split into the gates
    ``i, f, g, o`` (Keras's and PyTorch's order)::

        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    Args:
      preactivations: ``[..., 4 * units]``, the gates ``i, f, g, o`` side by side.
      cell: ``[..., units]``, the previous cell state ``c``.

    Returns:
      ``(hidden, cell)``, each ``[..., units]``: the new ``h'`` and ``c'``.

    >>> z = jnp.zeros((2, 4 * 3))                      # [batch, 4 * units]
    >>> hidden, cell = lstm_gates(z, jnp.ones((2, 3)))  # c' = 0.5 * 1 + 0.5 * tanh(0)
    >>> cell[0], hidden.shape
    (Array([0.5, 0.5, 0.5], dtype=float32), (2, 3))
    """
    i, f, g, o = jnp.split(preactivations, 4, axis=-1)
    cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return hidden, cell
