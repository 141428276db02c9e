"""Keras's LSTM bias initialiser, written once for the Flax module and the Keras layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

BaseInit = Callable[[tuple[int, ...], Any], Any]
"""``init(shape, dtype) -> array``, the signature of a Keras initialiser."""


def unit_forget_bias(units: int, base: BaseInit) -> BaseInit:
    """The bias ``[4 * units]`` of ``keras.layers.LSTM(unit_forget_bias=True)``:
    ``base`` for the gates ``i``, ``g`` and ``o``, ones for the forget gate ``f``.

    >>> unit_forget_bias(2, jnp.zeros)((8,), jnp.float32)
    Array([0., 0., 1., 1., 0., 0., 0., 0.], dtype=float32)
    """

    def init(shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        if tuple(shape) != (4 * units,):
            raise ValueError(f"shape: expected ({4 * units},); received {tuple(shape)}")
        return jnp.concatenate(
            [base((units,), dtype), jnp.ones((units,), dtype), base((2 * units,), dtype)]
        )

    return init
