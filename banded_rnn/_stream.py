"""``Stream``: a running stream whose per-band state stays on the device between calls."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from . import _stream_file, _validate
from ._banded import BandedLSTM
from ._compile_count import CompileCounter
from ._state import State, batch_mask, reset_state, zero_state
from ._stream_step import stream_spec, stream_step


def _default_buckets(max_chunk: int) -> list[int]:
    """The powers of two below ``max_chunk``, and ``max_chunk``."""
    return [2**k for k in range(max_chunk.bit_length()) if 2**k < max_chunk] + [max_chunk]


class Stream:
    """A running stream: ``batch_size`` sequences of ``num_bands`` bands, with
    their state carried from call to call on the device.

    ``stream(chunk)`` feeds ``chunk [batch, bands, time, features]`` of any
    ``time >= 1`` and returns the outputs ``[batch, bands, time, units]`` as a
    NumPy array. A chunk runs as pieces of bucket lengths, the longest that
    fits first (13 steps with the default buckets of ``max_chunk=16``: 8, 4
    and 1), so the stream runs only ``len(buckets)`` compiled shapes: after
    :meth:`warmup` no call compiles again, whatever the chunk lengths. Pieces
    are never padded while the buckets include 1 (the default), and streaming
    then equals one whole-sequence ``apply`` bit for bit. (With custom buckets
    that lack 1, a remainder shorter than the smallest bucket is zero-padded up
    to it and the padding masked, which rounds differently: about 1e-6.)

    >>> import jax, numpy as np
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
      model: the ``BandedLSTM``.
      variables: its variables; moved to the device once, here.
      batch_size, num_bands: the stream's ``[batch, bands]``.
      max_chunk: the longest piece run in one compiled call.
      buckets: the piece lengths compiled; by default the powers of two below
        ``max_chunk``, and ``max_chunk``. Must contain ``max_chunk``.
      dtype: the floating dtype chunks are cast to on the host (one dtype, so
        one compilation per bucket).
    """

    def __init__(
        self,
        model: BandedLSTM,
        variables: Any,
        batch_size: int,
        num_bands: int,
        max_chunk: int = 16,
        *,
        buckets: Sequence[int] | None = None,
        dtype: Any = np.float32,
    ) -> None:
        spec = stream_spec(model, variables, batch_size, num_bands, dtype)
        self.batch_size, self.num_bands = spec.batch_size, spec.num_bands
        self.features, self.dtype = spec.features, spec.dtype
        self._chunk_shape = (self.batch_size, self.num_bands, self.features)
        self.max_chunk = _validate.positive_int(max_chunk, "max_chunk")
        self.buckets = self._check_buckets(buckets)
        self._spec = spec
        self._model = model
        self._compiles = CompileCounter()
        self._variables = jax.device_put(variables)
        self._fingerprint: dict[str, Any] | None = None
        self._compiled_step = stream_step(model)
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

    def _zeros(self) -> State:
        def put_zeros(shape, dtype):
            return jax.device_put(np.zeros(shape, dtype))

        spec = self._spec
        return zero_state(self._model.num_layers, spec.state_shape, spec.state_dtype, put_zeros)

    @property
    def compile_count(self) -> int:
        """How many XLA compilations this stream's methods have caused so far."""
        return self._compiles.count

    @property
    def state(self) -> State:
        """A copy of the current state: ``num_layers`` LSTMState, each field
        ``[batch, bands, units]``, with pending resets applied. Later calls
        never invalidate it."""
        with self._compiles:
            return self._copy_state(self._state, self._reset_mask(None))

    def _check_chunk(self, chunk: Any) -> Any:
        """``chunk`` as an array of the stream's dtype, or raises."""
        if not hasattr(chunk, "shape") or not hasattr(chunk, "dtype"):
            chunk = np.asarray(chunk)
        shape = tuple(chunk.shape)
        if shape[:2] + shape[3:] != self._chunk_shape or chunk.dtype != self.dtype or not shape[2]:
            _validate.check_inputs(  # the full checks, off the common path
                chunk,
                "chunk",
                features=self.features,
                batch_bands=(self.batch_size, self.num_bands),
                nonempty=True,
            )
        if type(chunk) is np.ndarray:
            return chunk if chunk.dtype == self.dtype else chunk.astype(self.dtype)
        if isinstance(chunk, jax.Array) and chunk.dtype == self.dtype and shape[2] in self.buckets:
            return chunk  # already on the device, and runs as it is: one bucket
        return np.asarray(chunk, self.dtype)

    def _reset_mask(self, reset: Any) -> jax.Array:
        """The pending resets and ``reset`` (checked), as a device mask ``[batch, bands]``."""
        mask = self._pending_reset
        if reset is not None:
            _validate.check_batch_mask(reset, self.batch_size, self.num_bands)
            given = np.broadcast_to(
                np.asarray(reset).reshape(self.batch_size, -1), (self.batch_size, self.num_bands)
            )
            mask = given if mask is None else mask | given
        return self._no_reset if mask is None else jax.device_put(mask)

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

    def _run_piece(self, piece: Any, reset_mask: jax.Array) -> jax.Array:
        """Runs one piece of a bucket's length, or shorter than every bucket
        (padded, the padding masked); returns its outputs, padding included."""
        length = piece.shape[2]
        lengths = None
        if length < self.buckets[0]:
            padded = np.zeros((*piece.shape[:2], self.buckets[0], self.features), self.dtype)
            padded[:, :, :length] = piece
            piece, lengths = padded, self._padding_lengths[length]
        self._state, out = self._compiled_step(
            self._variables, self._state, piece, reset_mask, lengths
        )
        self._pending_reset = None
        return out

    def __call__(self, chunk: Any, reset: Any = None) -> np.ndarray:
        """Feeds ``chunk [batch, bands, time, features]`` and returns the outputs
        ``[batch, bands, time, units]`` (NumPy). ``reset``, a bool mask
        ``[batch]`` or ``[batch, bands]``, restarts those streams from zeros
        before the chunk. Bad input raises before the state is touched."""
        chunk = self._check_chunk(chunk)
        reset_mask = self._reset_mask(reset)
        pieces = self._split(chunk.shape[2])
        with self._compiles:
            if len(pieces) == 1:
                return np.asarray(self._run_piece(chunk, reset_mask))[:, :, : pieces[0]]
            outputs, start = [], 0
            for length in pieces:
                out = self._run_piece(chunk[:, :, start : start + length], reset_mask)
                outputs.append((out, length))  # converted after all are dispatched
                start += length
                reset_mask = self._no_reset
            return np.concatenate([np.asarray(out)[:, :, :n] for out, n in outputs], axis=2)

    def reset(self, batch: Sequence[int] | int | None = None) -> None:
        """Restarts sequences from a zero state: all of them, or those at the
        indices ``batch``. Takes effect inside the next compiled call."""
        if batch is not None:
            batch = _validate.check_batch_indices(batch, self.batch_size)
        mask = batch_mask(batch, (self.batch_size, self.num_bands))
        pending = self._pending_reset
        self._pending_reset = mask if pending is None else pending | mask

    def warmup(self) -> None:
        """Compiles every bucket (and the padded smallest one, if it is longer
        than 1) and the state copy, on a scratch state: the stream's own state
        is left as it is."""
        shape = (self.batch_size, self.num_bands)
        runs = [(bucket, None) for bucket in self.buckets]
        runs += [(self.buckets[0], lengths) for lengths in list(self._padding_lengths.values())[:1]]
        with self._compiles:
            scratch = self._zeros()
            for bucket, lengths in runs:
                chunk = np.zeros((*shape, bucket, self.features), self.dtype)
                scratch, out = self._compiled_step(
                    self._variables, scratch, chunk, self._no_reset, lengths
                )
            jax.block_until_ready((self._copy_state(scratch, self._no_reset), out))

    def _expected_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = _stream_file.fingerprint(
                self._model, self._variables, self.batch_size, self.num_bands
            )
        return self._fingerprint

    def save(self, path: str | os.PathLike) -> None:
        """Writes the state (pending resets applied) to ``path`` (``.npz``) with a
        fingerprint of the model: config, variable shapes and a weights digest."""
        state = jax.tree.map(np.asarray, self.state)
        _stream_file.save(path, state, self._expected_fingerprint())

    def load(self, path: str | os.PathLike) -> None:
        """Replaces the state by the one saved at ``path``. A file from another
        model, weights or stream shape raises ``ValueError`` and changes nothing."""
        state = _stream_file.load(
            path, self._expected_fingerprint(), self._spec.state_shape, self._spec.state_dtype
        )
        self._state = jax.tree.map(lambda a: jax.device_put(np.array(a)), state)
        self._pending_reset = None
