"""One layer's forward weights packed ahead of time, in the layout the native
kernel reads: the packed-weights collection and the ``packing()`` mark.

``Stream`` fills :data:`PACKED_COLLECTION` once, inside :func:`packing` with
the collection mutable, so that its per-frame calls skip the packing. Nothing
else creates the collection, so ``init`` and training never carry a copy that
could go stale (docs/guides/internals.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from . import _native

_packing = contextvars.ContextVar("banded_rnn_packing", default=False)

PACKED_COLLECTION = "banded_rnn_packed"
"""The Flax collection of forward weights packed ahead of time (see
:func:`pack_forward`): ``Stream`` fills it once, so that its per-frame calls
skip the packing."""


@contextlib.contextmanager
def packing() -> Iterator[None]:
    """Inside this block, a ``BandedLSTM`` applied with
    :data:`PACKED_COLLECTION` mutable stores its packed forward weights there."""
    token = _packing.set(True)
    try:
        yield
    finally:
        _packing.reset(token)


def packing_requested() -> bool:
    """Whether a :func:`packing` block is active in this context."""
    return _packing.get()


def packed_shape(features: int, units: int) -> tuple[int, int, int, int, int]:
    """The shape of one layer's packed forward weights for the instruction
    set in use: ``[blocks, passes, 1 + features + units, vectors, width]``,
    ``vectors`` the gates one pass of its microkernel sums (``passes * vectors
    == 4``)."""
    width, vectors = _native.width(), _native.tile_vectors()
    return (-(-units // width), 4 // vectors, 1 + features + units, vectors, width)


def pack_forward(kernel: jax.Array, recurrent: jax.Array, bias: jax.Array) -> jax.Array:
    """The layout the forward kernel reads its weights in, computed by XLA:
    ``packed[block, p, k, v, lane] = [bias; kernel; recurrent][k, (p * vectors
    + v) * u + block * width + lane]``, zero past ``units``. Given to
    :func:`~._native_layer.recurrence`, it spares the kernel packing them on
    every call (0.9 ms of a 3.8 ms frame for two layers of 384 units,
    benchmarks/NOTES.md entry 14)."""
    features, units = kernel.shape[0], recurrent.shape[0]
    blocks, passes, rows, vectors, width = packed_shape(features, units)
    stacked = jnp.concatenate([bias[None], kernel, recurrent], axis=0).reshape(rows, 4, units)
    stacked = jnp.pad(stacked, ((0, 0), (0, 0), (0, blocks * width - units)))
    stacked = stacked.reshape(rows, passes, vectors, blocks, width)
    return stacked.transpose(3, 1, 0, 2, 4)
