"""The recurrent state of a banded LSTM: named, never a bare ``(c, h)`` pair."""

from __future__ import annotations

from typing import NamedTuple

import jax


class LSTMState(NamedTuple):
    """The state of one LSTM layer for every sequence and band.

    Attributes:
      hidden: ``[batch, bands, units]``, the last output ``h``.
      cell: ``[batch, bands, units]``, the memory cell ``c``.

    A model of ``num_layers`` layers carries a ``tuple`` of ``num_layers``
    ``LSTMState``, first layer first, even when ``num_layers == 1``. Keras
    orders the pair ``[h, c]``, PyTorch ``(h, c)`` and Flax ``(c, h)``: naming
    the fields removes the doubt.
    """

    hidden: jax.Array
    cell: jax.Array


State = tuple[LSTMState, ...]
"""The state of a whole stack: one :class:`LSTMState` per layer."""
