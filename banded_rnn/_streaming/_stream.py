"""``Stream``: a running stream whose per-band state stays on the device between calls."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .. import _validate
from .._state import all_finite, batch_mask, nonfinite_rows, reset_state
from . import _file
from ._compile_count import CompileCounter
from ._step import (
    jitted_step,
    stream_apply,
    stream_spec,
    with_packed_weights,
    without_packed_weights,
)

OUTPUTS = ("numpy", "device")
"""``Stream``'s ``outputs`` values."""


def _default_buckets(max_chunk: int) -> list[int]:
    """The powers of two below ``max_chunk``, and ``max_chunk``."""
    return [2**k for k in range(max_chunk.bit_length()) if 2**k < max_chunk] + [max_chunk]


class Stream:
    """A running stream: ``batch_size`` sequences of ``num_bands`` bands, with
    their state carried from call to call on the device.

    ``stream(chunk)`` feeds ``chunk [batch, bands, time, features]`` of any
    ``time >= 1`` and returns the outputs ``[batch, bands, time, ...]`` as a
    NumPy array (or a device array, with ``outputs="device"``). A chunk runs as
    pieces of bucket lengths, the longest that fits first (13 steps with the
    default buckets of ``max_chunk=16``: 8, 4 and 1), so the stream runs only
    ``len(buckets)`` compiled shapes: after :meth:`warmup` no call compiles
    again, whatever the chunk lengths. Pieces are never padded while the
    buckets include 1 (the default), and streaming then equals one
    whole-sequence ``apply`` bit for bit. (With custom buckets that lack 1, a
    remainder shorter than the smallest bucket is zero-padded up to it and the
    padding masked with ``seq_lengths``, which rounds differently: about 1e-6.)

    The model is a ``BandedLSTM`` or any Flax module with its calling
    convention, ``model.apply(variables, state, inputs, ...) -> (final_state,
    outputs)``, e.g. per-band layers before and after one or more
    ``BandedLSTM``. Given ``state=None`` it starts from its zero state (as
    ``BandedLSTM`` does, and as ``fit`` relies on); its state may be any pytree
    whose leaves are ``[batch, bands, ...]``, and must come back with the same
    structure and shapes. Its layers outside the ``BandedLSTM`` s must act on
    each time step alone (dense, per-band layers): whatever crosses a chunk
    boundary has to be in the state. ``deterministic=True`` is passed where
    ``model.__call__`` takes it, so dropout is off.

    >>> import jax, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 10, 4), np.float32)
    >>> variables = model.init(jax.random.key(0), None, x)
    >>> stream = Stream(model, variables, batch_size=2, num_bands=3, max_chunk=4)
    >>> stream.warmup()
    >>> compiled = stream.compile_count
    >>> y = np.concatenate([stream(x[:, :, :3]), stream(x[:, :, 3:])], axis=2)
    >>> y.shape, stream.compile_count == compiled      # [batch, bands, time, units]
    ((2, 3, 10, 8), True)
    >>> stream.reset(batch=[1])                        # restart sequence 1 only

    Args:
      model: the ``BandedLSTM``, or a Flax module with its calling convention.
      variables: its variables; moved to the device once, here.
      batch_size, num_bands: the stream's ``[batch, bands]``.
      max_chunk: the longest piece run in one compiled call.
      buckets: the piece lengths compiled; by default the powers of two below
        ``max_chunk``, and ``max_chunk``. Must contain ``max_chunk``; may lack 1
        only if ``model.__call__`` takes ``seq_lengths``.
      dtype: the floating dtype chunks are cast to on the host (one dtype, so
        one compilation per bucket).
      features: the chunks' last axis. Read from the variables of a
        ``BandedLSTM``; required for other models.
      outputs: ``"numpy"`` (the default): each call returns a NumPy array,
        waiting for the computation. ``"device"``: a ``jax.Array`` on the
        device, returned as soon as the work is dispatched, for callers that
        chain more JAX work or convert later. (A chunk that runs as several
        pieces is joined on the host and put back on the device: no
        compilation, two copies.)
      check_finite: refuse, with a ``ValueError``, a chunk holding a NaN or an
        infinity, and a call whose new state would hold one, leaving the
        stored state and pending resets as they were (one NaN would otherwise
        stay in that stream's state until it is reset). Costs a pass over
        each chunk on the host and a check of the state on the device per
        call; the state is then not updated in place (not donated).

    One ``Stream`` may be shared by threads: calls, :meth:`reset`,
    :meth:`save`, :meth:`load` and :attr:`state` are serialised by a lock,
    and each call runs from the state the one before it left.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Any,
        batch_size: int,
        num_bands: int,
        max_chunk: int = 16,
        *,
        buckets: Sequence[int] | None = None,
        dtype: Any = np.float32,
        features: int | None = None,
        outputs: str = "numpy",
        check_finite: bool = False,
    ) -> None:
        variables = without_packed_weights(variables)  # a Stream packs its own, below
        spec = stream_spec(model, variables, batch_size, num_bands, dtype, features)
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs: expected one of {OUTPUTS}; received {outputs!r}")
        self.batch_size, self.num_bands = spec.batch_size, spec.num_bands
        self.features, self.dtype = spec.features, spec.dtype
        self.outputs = outputs
        self._device_outputs = outputs == "device"
        self._chunk_shape = (self.batch_size, self.num_bands, self.features)
        self.max_chunk = _validate.positive_int(max_chunk, "max_chunk")
        self.buckets = self._check_buckets(buckets)
        if self.buckets[0] > 1 and not spec.takes_seq_lengths:
            raise ValueError(
                f"buckets: without 1, a remainder shorter than {self.buckets[0]} steps is "
                f"padded and the padding masked with seq_lengths, which "
                f"{type(model).__name__}.__call__ does not take; received {list(self.buckets)}"
            )
        self._spec = spec
        self._model = model
        self._compiles = CompileCounter()
        self._variables = jax.device_put(variables)
        with self._compiles:  # one compilation, where the kernel runs
            self._step_variables = with_packed_weights(
                model,
                self._variables,
                np.zeros((*self._chunk_shape[:2], 1, self.features), self.dtype),
            )
        self._fingerprint: dict[str, Any] | None = None
        self.check_finite = bool(check_finite)
        # With check_finite, a refused call must leave the state it started from.
        self._compiled_step = (
            jax.jit(partial(stream_apply, model)) if check_finite else jitted_step(model)
        )
        self._all_finite = jax.jit(all_finite)
        self._lock = threading.Lock()
        self._copy_state = jax.jit(reset_state)  # a fresh copy, pending resets applied
        self._no_reset = jax.device_put(np.zeros((self.batch_size, self.num_bands), np.bool_))
        # A remainder shorter than the smallest bucket is padded up to it, and
        # the padding masked by these device-resident seq_lengths.
        self._padding_lengths = {
            length: jax.device_put(np.full(self.batch_size, length, np.int32))
            for length in range(1, self.buckets[0])
        }
        self._pieces_of = {t: self._greedy_pieces(t) for t in range(1, self.max_chunk)}
        self._state = self._zeros()
        self._pending_reset: np.ndarray | None = None

    def _check_buckets(self, buckets: Sequence[int] | None) -> tuple[int, ...]:
        if buckets is None:
            buckets = _default_buckets(self.max_chunk)
        buckets = sorted({_validate.positive_int(b, "buckets") for b in buckets})
        if buckets[-1] != self.max_chunk:
            raise ValueError(
                f"buckets: expected lengths up to and including max_chunk = {self.max_chunk}; "
                f"received {buckets}"
            )
        return tuple(buckets)

    def _zeros(self) -> Any:
        return self._spec.zeros(lambda shape, dtype: jax.device_put(np.zeros(shape, dtype)))

    @property
    def compile_count(self) -> int:
        """How many XLA compilations this stream's methods have caused so far."""
        return self._compiles.count

    @property
    def state(self) -> Any:
        """A copy of the current state, with pending resets applied. For a
        ``BandedLSTM``, ``num_layers`` LSTMState, each field ``[batch, bands,
        units]``; for another model, the pytree it returns. Later calls never
        invalidate it."""
        with self._lock, self._compiles:
            mask = self._pending_reset
            return self._copy_state(self._state, self._no_reset if mask is None else mask)

    def _check_chunk(self, chunk: Any) -> tuple[Any, int]:
        """``chunk`` as an array of the stream's dtype, and its length; or raises."""
        kind = type(chunk)
        if kind is not np.ndarray and not isinstance(chunk, jax.Array):
            chunk, kind = np.asarray(_validate.as_array(chunk, "chunk")), np.ndarray
        shape, dtype = chunk.shape, chunk.dtype
        if shape[:2] + shape[3:] != self._chunk_shape or dtype != self.dtype or not shape[2]:
            _validate.check_inputs(  # the full checks, off the common path
                chunk,
                "chunk",
                features=self.features,
                batch_bands=(self.batch_size, self.num_bands),
                nonempty=True,
            )
        time = shape[2]
        if self.check_finite:
            _validate.refuse_nonfinite(chunk, "chunk", "[sequence, band, step]")
        if kind is np.ndarray:
            return (chunk if dtype == self.dtype else chunk.astype(self.dtype)), time
        if dtype == self.dtype and time in self.buckets:
            return chunk, time  # already on the device, and runs as it is: one bucket
        return np.asarray(chunk, self.dtype), time

    def _reset_mask(self, reset: Any) -> np.ndarray | None:
        """``reset`` (checked) as a mask ``[batch, bands]``; None for None."""
        if reset is None:
            return None
        _validate.check_batch_mask(reset, self.batch_size, self.num_bands)
        return np.broadcast_to(
            np.asarray(reset).reshape(self.batch_size, -1), (self.batch_size, self.num_bands)
        )

    def _split(self, time: int) -> list[int]:
        """The lengths of the pieces ``time`` steps run as: the longest bucket
        that fits, again and again; a remainder shorter than every bucket is one
        more piece, padded."""
        full, rest = divmod(time, self.max_chunk)
        return [self.max_chunk] * full + (self._pieces_of[rest] if rest else [])

    def _greedy_pieces(self, time: int) -> list[int]:
        pieces = []
        while time:
            piece = next((b for b in reversed(self.buckets) if b <= time), time)
            pieces.append(piece)
            time -= piece
        return pieces

    def _run_piece(self, state: Any, piece: Any, length: int) -> tuple[Any, jax.Array]:
        """Runs one piece of ``length`` steps, a bucket's or shorter than every
        bucket (padded, the padding masked); returns the state and the outputs,
        padding included."""
        if length >= self.buckets[0]:
            return self._compiled_step(self._step_variables, state, piece)
        padded = np.zeros((*piece.shape[:2], self.buckets[0], self.features), self.dtype)
        padded[:, :, :length] = piece
        return self._compiled_step(
            self._step_variables, state, padded, None, self._padding_lengths[length]
        )

    def __call__(self, chunk: Any, reset: Any = None) -> Any:
        """Feeds ``chunk [batch, bands, time, features]`` and returns the outputs
        ``[batch, bands, time, ...]``: NumPy, or a ``jax.Array`` with
        ``outputs="device"``. ``reset``, a bool mask ``[batch]`` or ``[batch,
        bands]``, restarts those streams from zeros before the chunk. Bad input
        raises before the state is touched."""
        chunk, time = self._check_chunk(chunk)
        given = self._reset_mask(reset)
        with self._lock, self._compiles:
            mask = self._pending_reset
            if given is not None:
                mask = given if mask is None else mask | given
            # Resets go through the compiled state copy: the step then has one
            # compiled form per bucket, with no mask to pass on every call.
            state = self._state if mask is None else self._copy_state(self._state, mask)
            if time in self.buckets:  # the common case: one compiled call, nothing to cut
                state, out = self._compiled_step(self._step_variables, state, chunk)
                self._commit(state)
                return out if self._device_outputs else np.asarray(out)
            pieces, start = [], 0
            try:
                for length in self._split(time):
                    state, out = self._run_piece(state, chunk[:, :, start : start + length], length)
                    pieces.append((out, length))
                    start += length
            except BaseException:  # an interrupt between pieces: keep what they donated to
                if pieces and not self.check_finite:
                    self._state, self._pending_reset = state, None
                raise
            self._commit(state)
            # Joined on the host after every piece is dispatched: JAX ops would
            # compile once per new pattern of pieces, after warmup.
            joined = np.concatenate([np.asarray(out)[:, :, :n] for out, n in pieces], axis=2)
            return jax.device_put(joined) if self._device_outputs else joined

    def _commit(self, state: Any) -> None:
        """Makes ``state`` the stream's, pending resets done; with
        ``check_finite``, first refuses a state that is not finite."""
        if self.check_finite and not bool(self._all_finite(state)):
            rows = nonfinite_rows(state)
            raise ValueError(
                f"chunk: the state it leads to holds NaN or infinite values at [sequence, "
                f"band] {rows[:8]}{' ...' if len(rows) > 8 else ''} (check_finite=True); the "
                "call is refused and the stream's state left as it was"
            )
        self._state, self._pending_reset = state, None

    def reset(self, batch: Sequence[int] | int | None = None) -> None:
        """Restarts sequences from a zero state: all of them, or those at the
        indices ``batch``. Takes effect inside the next compiled call."""
        if batch is not None:
            batch = _validate.check_batch_indices(batch, self.batch_size)
        mask = batch_mask(batch, (self.batch_size, self.num_bands))
        with self._lock:
            pending = self._pending_reset
            self._pending_reset = mask if pending is None else pending | mask

    def warmup(self) -> None:
        """Compiles every bucket (and the padded smallest one, if it is longer
        than 1) and the state copy, on a scratch state: the stream's own state
        is left as it is."""
        shape = (self.batch_size, self.num_bands)
        # Called exactly as _run_piece calls: the padded piece with its lengths.
        runs = [(bucket, ()) for bucket in self.buckets]
        runs += [(self.buckets[0], (None, lengths)) for lengths in self._padding_lengths.values()]
        with self._compiles:
            scratch = self._zeros()
            for bucket, extra in runs[: len(self.buckets) + 1]:
                chunk = np.zeros((*shape, bucket, self.features), self.dtype)
                scratch, out = self._compiled_step(self._step_variables, scratch, chunk, *extra)
            scratch = self._copy_state(scratch, self._no_reset)
            finite = self._all_finite(scratch) if self.check_finite else None
            jax.block_until_ready((scratch, out, finite))

    def _expected_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = _file.fingerprint(
                self._model,
                self._variables,
                self._spec.state_layout(),
                self.batch_size,
                self.num_bands,
            )
        return self._fingerprint

    def save(self, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> None:
        """Writes the state (pending resets applied) to ``path`` (``.npz``) with a
        fingerprint of the model: its class, variable shapes, a weights digest
        and the state's layout. The file is written beside ``path``, synced,
        renamed over it and the directory synced: a crash at any point leaves
        the old file or the new one. A state holding NaN or infinities raises
        ``ValueError`` unless ``allow_nonfinite``."""
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(self.state)]
        _file.save(path, leaves, self._expected_fingerprint(), allow_nonfinite)

    def load(self, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> None:
        """Replaces the state by the one saved at ``path``. A file that is
        damaged, not a state file, from another model, weights or stream
        shape, or (unless ``allow_nonfinite``) holding NaN or infinities,
        raises ``ValueError`` naming it and changes nothing."""
        leaves = _file.load(path, self._expected_fingerprint(), allow_nonfinite)
        state = jax.tree.unflatten(
            jax.tree.structure(self._spec.state),
            [jax.device_put(np.array(leaf)) for leaf in leaves],
        )
        with self._lock:
            self._state, self._pending_reset = state, None
