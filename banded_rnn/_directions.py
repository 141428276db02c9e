"""Directions of a stack: which layers run backwards, how their steps are
reversed, and how a bidirectional layer merges its two outputs.

A backward direction runs forwards over the reversed steps. Within
``seq_lengths`` each sequence is reversed in place, so its valid steps stay
first (flax's ``flip_sequences``); with a mask, or no lengths, the whole time
axis is (Keras's ``go_backwards``). A reversed stack reverses its inputs once
and chains its layers in that order, so every layer runs backwards; a
bidirectional layer reverses and restores its own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MERGE_MODES = ("concat", "sum", "mul", "ave")
"""``BandedLSTM.merge_mode``'s values, Keras's ``Bidirectional`` merge modes."""


class Direction(NamedTuple):
    """One direction of one layer.

    Attributes:
      index: its place in the state tuple (PyTorch's ``h_n`` order: layer 0
        forward, layer 0 backward, layer 1 forward, ...).
      name: its parameters' name, ``layer_{i}`` or ``layer_{i}_reverse``.
      backward: whether it runs from the last step to the first.
      flips_inputs: whether it reverses the time order of its inputs (a
        bidirectional layer's backward half, or a reversed stack's first layer).
      restores_order: whether it reverses its outputs back into input order.
    """

    index: int
    name: str
    backward: bool
    flips_inputs: bool
    restores_order: bool


def directions(
    layer: int, num_layers: int, *, reverse: bool, bidirectional: bool, keep_order: bool
) -> tuple[Direction, ...]:
    """The directions layer ``layer`` of a stack runs, in the state's order."""
    if bidirectional:
        return (
            Direction(2 * layer, f"layer_{layer}", False, False, False),
            Direction(2 * layer + 1, f"layer_{layer}_reverse", True, True, True),
        )
    last = layer == num_layers - 1
    return (
        Direction(
            layer,
            f"layer_{layer}",
            reverse,
            reverse and layer == 0,
            reverse and keep_order and last,
        ),
    )


def flip_time(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """``x [time, batch, bands, ...]`` reversed in time: each (sequence, band)'s
    first ``lengths [batch, bands]`` steps reversed in place and the rest after
    them (as flax's ``flip_sequences``), or the whole axis when ``lengths`` is
    None. Its own inverse."""
    time = x.shape[0]
    if lengths is None or time == 0:
        return jnp.flip(x, axis=0)
    index = (jnp.arange(time - 1, -1, -1)[:, None, None] + lengths[None]) % time
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=0)


def flip_valid(valid: jax.Array | None, lengths: jax.Array | None) -> jax.Array | None:
    """The valid steps ``[time, batch, bands]`` of the reversed inputs: a mask
    reversed with the whole axis; unchanged within ``lengths``, where the valid
    steps stay first."""
    if valid is None or lengths is not None:
        return valid
    return valid[::-1]


def merge(mode: str, outputs: list[jax.Array]) -> jax.Array:
    """One direction's outputs as they are; two merged as Keras's
    ``Bidirectional`` does (``mode``, one of :data:`MERGE_MODES`)."""
    if len(outputs) == 1:
        return outputs[0]
    forward, backward = outputs
    if mode == "concat":
        return jnp.concatenate([forward, backward], axis=-1)
    if mode == "sum":
        return forward + backward
    if mode == "mul":
        return forward * backward
    return (forward + backward) / 2
