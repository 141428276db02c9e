"""The recurrent state of a banded LSTM, and every operation on it.

The state is named, never a bare ``(c, h)`` pair. Zeros and resets are
written here once, for the Flax module, :class:`~banded_rnn.Stream`, the
training loop and the Keras layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LSTMState(NamedTuple):
    """The state of one LSTM layer for every sequence and band.

    Attributes:
      hidden: ``[batch, bands, units]``, the last output ``h``.
      cell: ``[batch, bands, units]``, the memory cell ``c``.

    A model of ``num_layers`` layers carries a ``tuple`` of ``num_layers``
    ``LSTMState``, first layer first, even when ``num_layers == 1``. Keras
    orders the pair ``[h, c]``, PyTorch ``(h, c)`` and Flax ``(c, h)``: naming
    the fields removes the doubt.

    >>> from_keras = [jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))]  # Keras: [h, c]
    >>> state = (LSTMState(hidden=from_keras[0], cell=from_keras[1]),)  # one layer
    >>> state[0].hidden.shape                          # [batch, bands, units]
    (2, 3, 4)
    """

    hidden: jax.Array
    cell: jax.Array


State = tuple[LSTMState, ...]
"""The state of a whole stack: one :class:`LSTMState` per layer."""

ROW_AXES = ("batch", "bands")
"""The names of the state's leading axes, ``[batch, bands, ...]``: the mesh axes
that split rows (``banded_rnn.training.make_mesh`` names its axes so, and the
native kernel runs in ``shard_map`` over them)."""


def zero_state(num_layers: int, shape: tuple[int, int, int], dtype: Any = jnp.float32) -> State:
    """``num_layers`` ``LSTMState`` of zeros, each field of ``shape [batch, bands,
    units]``.

    Every field is its own buffer, so the state can be donated: XLA refuses to
    donate one buffer twice.

    >>> state = zero_state(2, (1, 3, 4))
    >>> len(state), state[1].cell.shape
    (2, (1, 3, 4))
    """
    return tuple(
        LSTMState(*(jnp.zeros(shape, dtype) for _ in LSTMState._fields)) for _ in range(num_layers)
    )


def reset_state(state: Any, reset: Any) -> Any:
    """Zeroes the states where ``reset`` is true, in any state pytree.

    ``reset`` is a bool mask ``[batch]`` (whole sequences) or ``[batch,
    bands]`` (single bands); every leaf of ``state`` has those leading axes.
    Pure and traceable: under ``jit``, which states are reset never
    recompiles.

    >>> state = jax.tree.map(jnp.ones_like, zero_state(1, (2, 3, 4)))
    >>> reset_state(state, jnp.array([True, False]))[0].hidden[:, 0, 0]
    Array([0., 1.], dtype=float32)
    """
    reset = jnp.asarray(reset)

    def zero(leaf: jax.Array) -> jax.Array:
        mask = reset.reshape(reset.shape + (1,) * (leaf.ndim - reset.ndim))
        return jnp.where(mask, jnp.zeros_like(leaf), leaf)

    return jax.tree.map(zero, state)


def batch_mask(indices: Any, shape: tuple[int, int]) -> np.ndarray:
    """The bool mask ``[batch, bands]`` that is true on the rows of ``indices``
    (validated batch indices; ``None`` means every row)."""
    mask = np.zeros(shape, np.bool_)
    mask[slice(None) if indices is None else list(indices)] = True
    return mask


def all_finite(state: Any) -> jax.Array:
    """Whether every value of every leaf of ``state`` is finite: one bool scalar."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(state)]))


def nonfinite_rows(state: Any) -> list[tuple[int, int]]:
    """The ``(sequence, band)`` rows where some leaf of ``state`` holds a NaN or
    an infinity, computed on the host."""
    bad = None
    for leaf in jax.tree.leaves(state):
        leaf = np.asarray(leaf)
        rows = ~np.isfinite(leaf).reshape(*leaf.shape[:2], -1).all(axis=-1)
        bad = rows if bad is None else bad | rows
    return [] if bad is None else [(int(b), int(n)) for b, n in np.argwhere(bad)]
