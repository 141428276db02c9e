"""Checks on user input, run on static shapes before anything reaches XLA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._state import LSTMState, State


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_inputs(inputs: Any, name: str = "inputs") -> jax.Array:
    """Returns ``inputs`` as an array of rank 4 and a floating dtype, or raises."""
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        inputs = jnp.asarray(inputs)
    if inputs.ndim != 4:
        raise ValueError(
            f"{name}: expected rank 4, [batch, bands, time, features]; "
            f"received shape {_shape(inputs)}"
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype; received {inputs.dtype}")
    return inputs


def check_features(features: int, expected: int, name: str = "inputs") -> None:
    if features != expected:
        raise ValueError(
            f"{name}: expected {expected} features (the parameters' kernel is "
            f"[{expected}, 4 * units]); received {features}"
        )


def check_state(
    state: Any, num_layers: int, batch: int, bands: int, units: int, name: str = "state"
) -> State:
    """Returns ``state`` as a tuple of ``num_layers`` LSTMState, or raises."""
    if isinstance(state, LSTMState) or not isinstance(state, Sequence):
        raise TypeError(
            f"{name}: expected a tuple of {num_layers} LSTMState (one per layer, "
            f"as model.initial_state returns); received {type(state).__name__}"
        )
    if len(state) != num_layers:
        raise ValueError(f"{name}: expected {num_layers} layer states; received {len(state)}")
    expected = (batch, bands, units)
    for layer, layer_state in enumerate(state):
        if not isinstance(layer_state, LSTMState):
            raise TypeError(
                f"{name}[{layer}]: expected an LSTMState(hidden, cell); "
                f"received {type(layer_state).__name__}"
            )
        for field, value in zip(LSTMState._fields, layer_state, strict=True):
            if _shape(value) != expected:
                raise ValueError(
                    f"{name}[{layer}].{field}: expected shape [batch, bands, units] = "
                    f"{expected}; received {_shape(value)}"
                )
            if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
                raise TypeError(
                    f"{name}[{layer}].{field}: expected a floating dtype; "
                    f"received {jnp.result_type(value)}"
                )
    return tuple(state)


def check_seq_lengths(
    seq_lengths: Any, batch: int, bands: int, name: str = "seq_lengths"
) -> jax.Array:
    """Returns ``seq_lengths`` broadcast to ``[batch, bands]``, or raises."""
    shape = _shape(seq_lengths)
    if shape not in ((batch,), (batch, bands)):
        raise ValueError(
            f"{name}: expected shape [batch] = ({batch},) or [batch, bands] = "
            f"({batch}, {bands}); received {shape}"
        )
    if not jnp.issubdtype(jnp.result_type(seq_lengths), jnp.integer):
        raise TypeError(
            f"{name}: expected an integer dtype; received {jnp.result_type(seq_lengths)}"
        )
    if not isinstance(seq_lengths, jax.core.Tracer) and np.any(np.asarray(seq_lengths) < 0):
        raise ValueError(f"{name}: expected lengths >= 0; received {np.asarray(seq_lengths)}")
    seq_lengths = jnp.asarray(seq_lengths)
    if seq_lengths.ndim == 1:
        seq_lengths = seq_lengths[:, None]
    return jnp.broadcast_to(seq_lengths, (batch, bands))


def check_mask(mask: Any, batch: int, bands: int, time: int, name: str = "mask") -> jax.Array:
    """Returns ``mask`` broadcast to ``[batch, bands, time]``, or raises."""
    shape = _shape(mask)
    if shape not in ((batch, time), (batch, bands, time)):
        raise ValueError(
            f"{name}: expected shape [batch, time] = ({batch}, {time}) or "
            f"[batch, bands, time] = ({batch}, {bands}, {time}); received {shape}"
        )
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"{name}: expected a bool dtype; received {jnp.result_type(mask)}")
    mask = jnp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[:, None, :]
    return jnp.broadcast_to(mask, (batch, bands, time))
