"""One layer's recurrence through cuDNN's fused LSTM (``jax.experimental.rnn``), on GPUs.

cuDNN runs every time step of a chunk in one call, forward and backward. It
takes batch-major ``[rows, time, features]`` inputs, the state ``[layers,
rows, units]``, lengths per row, and the weights as one flat vector in its own
layout; our ``[time, batch, bands, ...]`` layer runs there with the bands
folded into its rows (rows never mix) and our parameters packed into that
layout inside the jitted function, so gradients reach ``kernel``,
``recurrent_kernel`` and ``bias``.

The call is made per layer (``num_layers=1``), so that the input dropout
between layers keeps its masks (one per sequence and band) as on the scan.
Calls with a ``mask``, recurrent dropout or ``remat_chunk`` are refused:
cuDNN knows lengths only, draws its own dropout masks per step, and keeps its
own residuals. ``jax.experimental.rnn``'s primitives have no batching rule, so
the call cannot run under ``jax.vmap``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import rnn

from .._cell import LayerWeights

PLATFORMS = ("gpu", "cuda")
"""The backends cuDNN's LSTM lowers for (JAX registers it for CUDA)."""

cudnn_lstm = rnn.lstm
"""The fused call: ``jax.experimental.rnn.lstm``. Tests on machines without a
GPU put ``jax.experimental.rnn.lstm_ref`` behind the same signature here, to
run everything of this module but cuDNN itself."""


def platform_supported() -> bool:
    """Whether JAX's default backend is one cuDNN's LSTM runs on."""
    return jax.default_backend() in PLATFORMS


def pack(weights: LayerWeights) -> jax.Array:
    """One layer's ``(kernel [features, 4u], recurrent_kernel [u, 4u], bias
    [4u])`` as cuDNN's flat weight vector: ``W_ih [4u, features]``, ``W_hh
    [4u, u]``, then the biases ``b_ih`` (ours) and ``b_hh`` (zeros). The gate
    order, ``i, f, g, o``, is the same on both sides."""
    kernel, recurrent_kernel, bias = weights
    return jnp.concatenate(
        [kernel.T.ravel(), recurrent_kernel.T.ravel(), bias, jnp.zeros_like(bias)]
    )


def run_layer(
    weights: LayerWeights,
    carry: tuple[jax.Array, jax.Array],
    inputs: jax.Array,
    lengths: jax.Array | None,
    precision: Any = None,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One layer over ``inputs [time, batch, bands, features]`` from ``carry``
    (``hidden``, ``cell``, each ``[batch, bands, units]``), with ``lengths``
    (int32 ``[batch, bands]``; past ``time`` means every step, 0 or less
    none) or every step valid.

    Returns ``((hidden, cell), outputs [time, batch, bands, units])``: the
    state after each row's last valid step (its initial state for length 0),
    and past each row's length that state's hidden, as the scan gives them.
    """
    time, batch, bands, features = inputs.shape
    hidden, cell = carry
    units = hidden.shape[-1]
    rows = batch * bands
    x = jnp.moveaxis(inputs, 0, 2).reshape(rows, time, features)  # [rows, time, features]
    if lengths is None:
        lengths = jnp.full((batch, bands), time, jnp.int32)
    # cuDNN refuses lengths past the chunk (traced int32 lengths arrive
    # unclipped) and wants at least one step per row: a row of length 0 (or
    # less) runs one step whose result is dropped below.
    lengths = jnp.clip(lengths.reshape(rows), 0, time)
    y, h_n, c_n = cudnn_lstm(
        x,
        hidden.reshape(1, rows, units),
        cell.reshape(1, rows, units),
        pack(weights),
        jnp.maximum(lengths, 1),
        input_size=features,
        hidden_size=units,
        num_layers=1,
        dropout=0.0,
        bidirectional=False,
        precision=precision,
    )
    empty = (lengths == 0)[:, None]
    h_n = jnp.where(empty, hidden.reshape(rows, units), h_n[0])
    c_n = jnp.where(empty, cell.reshape(rows, units), c_n[0])
    valid = jnp.arange(time)[None, :, None] < lengths[:, None, None]
    y = jnp.where(valid, y, h_n[:, None, :])  # [rows, time, units]
    outputs = jnp.moveaxis(y.reshape(batch, bands, time, units), 2, 0)
    return (h_n.reshape(batch, bands, units), c_n.reshape(batch, bands, units)), outputs
