"""How one layer's recurrence runs, and the one function that chooses it.

Three backends share one contract (:meth:`Backend.run_layer`): the XLA scan
(:mod:`._scan`), the native CPU kernel (:mod:`._native`, :mod:`._native_layer`,
:mod:`._packed`) and cuDNN's fused LSTM (:mod:`._cudnn`). :func:`choose` picks
one from the module's ``implementation``, the platform and the call, in
Python, never by tracing; :func:`scan_only` overrides it for code that
``jax.export`` serialises (docs/guides/internals.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .._cell import LayerWeights, is_standard, lstm_gates
from . import _cudnn, _native, _native_layer
from ._chunking import scan_chunks
from ._scan import Gates, scan_layer

IMPLEMENTATIONS = ("auto", "kernel", "cudnn", "scan")
"""``BandedLSTM.implementation``'s values."""

_scan_only = contextvars.ContextVar("banded_rnn_scan_only", default=False)


@contextlib.contextmanager
def scan_only() -> Iterator[None]:
    """Inside this block, every ``BandedLSTM`` traced runs the XLA scan,
    whatever its ``implementation``: for tracing a fresh function that
    ``jax.export`` serialises (the kernel is a custom call it refuses)."""
    token = _scan_only.set(True)
    try:
        yield
    finally:
        _scan_only.reset(token)


@dataclasses.dataclass(frozen=True)
class Backend:
    """What runs a layer's recurrence: ``name`` is ``"native"`` (the CPU
    kernel), ``"scan"`` or ``"cudnn"``; ``remat_chunk`` rematerialises the
    recurrence in chunks of that many steps (scan and native); ``unroll`` and
    ``gates`` (the activations bound) apply to the scan."""

    name: str
    remat_chunk: int | None = None
    unroll: int | bool = 1
    gates: Gates = lstm_gates

    def run_layer(
        self,
        weights: LayerWeights,
        carry: tuple[jax.Array, jax.Array],
        inputs: jax.Array,
        *,
        valid: jax.Array | None,
        lengths: jax.Array | None,
        recurrent_mask: jax.Array | None = None,
        packed: jax.Array | None = None,
        batch_major: bool = False,
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """One layer over ``inputs [time, batch, bands, features]`` from
        ``carry = (h, c)``, each ``[batch, bands, units]``.

        ``valid [time, batch, bands]`` (or None: every step) says which steps
        update the state; an invalid step's output is the hidden state it
        leaves unchanged. cuDNN reads ``lengths [batch, bands]`` instead.
        ``recurrent_mask [batch, bands, units]`` multiplies ``h`` before the
        recurrent kernel; ``packed`` holds the weights as the native kernel
        reads them. Returns ``((h, c), outputs)``, the outputs ``[time, batch,
        bands, units]``, or ``[batch, bands, time, units]`` with
        ``batch_major`` (which the native kernel writes so, no transpose
        following it).
        """
        carry = tuple(_shard_like(c, inputs) for c in carry)
        if self.name == "cudnn":
            carry, outputs = _cudnn.run_layer(weights, carry, inputs, lengths)
            return carry, jnp.moveaxis(outputs, 0, 2) if batch_major else outputs
        if self.name == "native":
            layer = partial(_native_layer.run_layer, packed=packed)
        else:
            layer = partial(scan_layer, unroll=self.unroll, gates=self.gates)
        xs = (inputs, valid)
        if self.remat_chunk is None or inputs.shape[0] <= self.remat_chunk:
            if self.name == "native":
                return layer(weights, recurrent_mask, carry, xs, batch_major=batch_major)
            carry, outputs = layer(weights, recurrent_mask, carry, xs)
        else:
            # The backward pass keeps only the inputs and the state at chunk
            # boundaries and recomputes each chunk.
            run_chunk = jax.checkpoint(partial(layer, weights, recurrent_mask))
            carry, outputs = scan_chunks(run_chunk, carry, xs, self.remat_chunk, axis=0)
        return carry, jnp.moveaxis(outputs, 0, 2) if batch_major else outputs


def _shard_like(state: jax.Array, inputs: jax.Array) -> jax.Array:
    """``state [batch, bands, units]`` split over devices as ``inputs [time,
    batch, bands, features]`` is.

    A zero state made with ``jnp.zeros`` (or a state passed in replicated) is
    split over nothing. Inside ``shard_map`` the scan then refuses a carry that
    varies over fewer mesh axes than its update; under a mesh with explicit
    axes, concatenating it with the sharded inputs fails. Adding zeros sliced
    from the inputs gives the state their batch and bands layout; without a
    mesh, XLA folds the addition away.
    """
    # Summed over time rather than indexed, so that zero time steps work too.
    return state + jnp.zeros_like(inputs[..., :1].sum(axis=0), dtype=state.dtype)


def choose(
    implementation: str,
    *,
    dtype: Any,
    activation: Any,
    recurrent_activation: Any,
    masked: bool,
    recurrent_dropout: bool,
    remat_chunk: int | None,
    time: int,
) -> str:
    """The backend a call runs: ``"native"``, ``"scan"`` or ``"cudnn"``.

    ``implementation`` is the module's; ``dtype`` the call's arithmetic;
    ``masked`` whether it has a ``mask`` (not lengths); ``recurrent_dropout``
    whether recurrent dropout is on in this call. ``"auto"`` takes the native
    kernel where it applies (float32 on the CPU backend, the extension built,
    tanh and sigmoid), else the scan. An explicit ``"kernel"`` or ``"cudnn"``
    that cannot run this call is a ``ValueError`` (``RuntimeError`` for a
    kernel that is not built) naming why.
    """
    if implementation == "scan" or _scan_only.get():
        return "scan"
    standard = is_standard(activation, recurrent_activation)
    if implementation == "cudnn":
        _refuse_cudnn(dtype, standard, masked, recurrent_dropout, remat_chunk, time)
        return "cudnn"
    backend = jax.default_backend()
    fits = jnp.dtype(dtype) == jnp.float32 and backend == "cpu" and standard
    if implementation == "kernel":
        if not _native.available():
            raise RuntimeError(
                "implementation='kernel': the native CPU kernel is not built "
                f"({_native.info()['error']}); use 'auto' or 'scan'"
            )
        if not standard:
            raise ValueError(
                "implementation='kernel': the kernel runs the tanh and sigmoid "
                f"activations; this model has activation={activation!r}, "
                f"recurrent_activation={recurrent_activation!r} (use 'auto' or 'scan')"
            )
        if not fits:
            raise ValueError(
                "implementation='kernel': the kernel runs float32 on CPU; this call "
                f"computes in {jnp.dtype(dtype).name} on {backend} (use 'auto' or 'scan')"
            )
        return "native"
    if fits and not _native.available():
        _native.warn_unavailable()
        return "scan"
    return "native" if fits else "scan"


def _refuse_cudnn(dtype, standard, masked, recurrent_dropout, remat_chunk, time) -> None:
    """Raises ``ValueError`` naming every reason a call cannot run on cuDNN.
    ``"auto"`` never takes cuDNN: the path has not yet run on a GPU in this
    project's tests, and its call has no ``vmap`` rule."""
    reasons = {
        "it runs float32 only": jnp.dtype(dtype) != jnp.float32,
        f"it runs on {_cudnn.PLATFORMS} ({jax.default_backend()} here)": (
            not _cudnn.platform_supported()
        ),
        "it takes seq_lengths, not a mask": masked,
        "it draws its own dropout masks (recurrent_dropout in training)": recurrent_dropout,
        "it keeps its own residuals (remat_chunk)": remat_chunk is not None,
        "it needs at least one time step": time == 0,
        "it runs the tanh and sigmoid activations only": not standard,
    }
    refused = [reason for reason, applies in reasons.items() if applies]
    if refused:
        raise ValueError(
            f"implementation='cudnn': this call cannot run on cuDNN: {'; '.join(refused)} "
            "(use 'auto' or 'scan')"
        )
