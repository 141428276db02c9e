"""One loop over consecutive chunks of the time axis, for remat and for training windows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def scan_chunks(
    run: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    chunk_length: int,
    *,
    axis: int,
) -> tuple[Any, Any]:
    """Runs ``run(carry, piece) -> (carry, ys)`` over consecutive pieces of
    ``chunk_length`` steps of ``xs``, carrying ``carry`` from piece to piece.

    ``xs`` is a pytree (``None`` leaves allowed) whose arrays all have their
    time axis at ``axis``; the full pieces run in one ``jax.lax.scan`` and a
    shorter last piece, if any, after it. The ``ys`` of every piece are joined
    on ``axis``. ``carry`` must be concrete arrays (not ``None``).

    >>> def running_sum(total, x):
    ...     steps = total + jnp.cumsum(x)
    ...     return steps[-1], steps
    >>> scan_chunks(running_sum, 0.0, jnp.arange(5.0), 2, axis=0)
    (Array(10., dtype=float32), Array([ 0.,  1.,  3.,  6., 10.], dtype=float32))
    """
    time = jax.tree.leaves(xs)[0].shape[axis]
    if time <= chunk_length:
        return run(carry, xs)
    num_chunks = time // chunk_length
    split = num_chunks * chunk_length

    def to_chunks(a: jax.Array) -> jax.Array:
        a = jax.lax.slice_in_dim(a, 0, split, axis=axis)
        a = a.reshape(*a.shape[:axis], num_chunks, chunk_length, *a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)  # [chunks, ..., chunk_length, ...]

    def from_chunks(a: jax.Array) -> jax.Array:
        a = jnp.moveaxis(a, 0, axis)
        return a.reshape(*a.shape[:axis], split, *a.shape[axis + 2 :])

    carry, ys = jax.lax.scan(run, carry, jax.tree.map(to_chunks, xs))
    ys = jax.tree.map(from_chunks, ys)
    if split < time:
        tail = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, split, time, axis=axis), xs)
        carry, tail_ys = run(carry, tail)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=axis), ys, tail_ys)
    return carry, ys
