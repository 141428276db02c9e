"""The LSTM gate maths, written once for the whole package, and its activations."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

LayerWeights = tuple[jax.Array, jax.Array, jax.Array]
"""One layer's ``(kernel [features, 4 * units], recurrent_kernel [units, 4 * units],
bias [4 * units])``, the layout of ``keras.layers.LSTM``."""

Activation = Callable[[jax.Array], jax.Array]


def _hard_sigmoid(x: jax.Array) -> jax.Array:
    return jax.nn.relu6(x + 3.0) / 6.0


def _hard_silu(x: jax.Array) -> jax.Array:
    return x * _hard_sigmoid(x)


def _linear(x: jax.Array) -> jax.Array:
    return x


def _exponential(x: jax.Array) -> jax.Array:
    return jnp.exp(x)


def _tanh_shrink(x: jax.Array) -> jax.Array:
    return x - jnp.tanh(x)


ACTIVATIONS: dict[str, Activation] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "linear": _linear,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "exponential": _exponential,
    "hard_silu": _hard_silu,
    "hard_swish": _hard_silu,
    "hard_tanh": jax.nn.hard_tanh,
    "leaky_relu": partial(jax.nn.leaky_relu, negative_slope=0.2),
    "log_sigmoid": jax.nn.log_sigmoid,
    "mish": jax.nn.mish,
    "tanh_shrink": _tanh_shrink,
}
"""The activations named as in ``keras.activations``, with Keras 3's definitions
(``gelu`` exact, ``leaky_relu`` with slope 0.2, ``hard_sigmoid`` =
``relu6(x + 3) / 6``); the tests compare each with Keras's own."""


def activation_fn(activation: Any, name: str = "activation") -> Activation:
    """``activation`` as a function: a name of :data:`ACTIVATIONS`, or any
    callable (a JAX function of one array), returned as it is."""
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation]
        except KeyError:
            raise ValueError(
                f"{name}: expected a callable or one of {sorted(ACTIVATIONS)}; "
                f"received {activation!r}"
            ) from None
    if callable(activation):
        return activation
    raise TypeError(
        f"{name}: expected a callable or an activation name (str); "
        f"received {type(activation).__name__}"
    )


def is_standard(activation: Any, recurrent_activation: Any) -> bool:
    """Whether the activations are the usual ``tanh`` and ``sigmoid``, the only
    ones the fused paths (the native kernel, cuDNN) implement."""
    return (
        activation_fn(activation) is jnp.tanh
        and activation_fn(recurrent_activation, "recurrent_activation") is jax.nn.sigmoid
    )


def lstm_gates(
    preactivations: jax.Array,
    cell: jax.Array,
    activation: Activation = jnp.tanh,
    recurrent_activation: Activation = jax.nn.sigmoid,
) -> tuple[jax.Array, jax.Array]:
    """Applies the LSTM non-linearities to the summed gate pre-activations.

    With ``z = x @ kernel + h @ recurrent_kernel + bias`` split into the gates
    ``i, f, g, o`` (Keras's and PyTorch's order), ``act = activation`` and
    ``rec = recurrent_activation`` (by default tanh and sigmoid)::

        c' = rec(f) * c + rec(i) * act(g)
        h' = rec(o) * act(c')

    Args:
      preactivations: ``[..., 4 * units]``, the gates ``i, f, g, o`` side by side.
      cell: ``[..., units]``, the previous cell state ``c``.
      activation: the cell's activation, a function of one array.
      recurrent_activation: the gates' activation.

    Returns:
      ``(hidden, cell)``, each ``[..., units]``: the new ``h'`` and ``c'``.

    >>> z = jnp.zeros((2, 4 * 3))                      # [batch, 4 * units]
    >>> hidden, cell = lstm_gates(z, jnp.ones((2, 3)))  # c' = 0.5 * 1 + 0.5 * tanh(0)
    >>> cell[0], hidden.shape
    (Array([0.5, 0.5, 0.5], dtype=float32), (2, 3))
    """
    i, f, g, o = jnp.split(preactivations, 4, axis=-1)
    cell = recurrent_activation(f) * cell + recurrent_activation(i) * activation(g)
    hidden = recurrent_activation(o) * activation(cell)
    return hidden, cell
