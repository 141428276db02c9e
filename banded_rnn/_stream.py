"""Streaming inference: a compiled step with per-stream reset, and a stateful runner over it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _stream_file, _validate
from ._banded import BandedLSTM
from ._state import LSTMState, State

StepFn = Callable[..., tuple[State, jax.Array]]


def _check_reset(reset: Any, batch: int, bands: int, name: str = "reset") -> None:
    shape = tuple(np.shape(reset))
    if shape not in ((batch,), (batch, bands)):
        raise ValueError(
            f"{name}: expected a bool mask of shape [batch] = ({batch},) or [batch, bands] = "
            f"({batch}, {bands}); received shape {shape}"
        )
    if jnp.result_type(reset) != jnp.bool_:
        raise TypeError(f"{name}: expected a bool mask; received dtype {jnp.result_type(reset)}")


def _reset_state(state: State, reset: jax.Array) -> State:
    """Zeroes the states where ``reset`` (``[batch]`` or ``[batch, bands]``) is true."""
    batch, bands = state[0].hidden.shape[:2]
    mask = jnp.broadcast_to(jnp.reshape(reset, (batch, -1)), (batch, bands))[:, :, None]
    return tuple(
        LSTMState(*(jnp.where(mask, jnp.zeros_like(a), a) for a in layer)) for layer in state
    )


def _step(
    model: BandedLSTM,
    variables: Any,
    state: State | None,
    chunk: jax.Array,
    reset: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
) -> tuple[State, jax.Array]:
    # These checks run while tracing, before XLA and before any buffer is donated.
    chunk = _validate.check_inputs(chunk, "chunk")
    batch, bands, time, features = chunk.shape
    kernel = variables.get("params", {}).get("layer_0", {}).get("kernel")
    if kernel is not None:
        _validate.check_features(features, kernel.shape[0], "chunk")
    if time < 1:
        raise ValueError(
            "chunk: expected at least one time step, [batch, bands, time >= 1, features]; "
            f"received shape {tuple(chunk.shape)}"
        )
    if state is not None:
        first = state[0] if isinstance(state, Sequence) and len(state) else None
        if isinstance(first, LSTMState) and tuple(np.shape(first.hidden))[:2] != (batch, bands):
            raise ValueError(
                f"chunk: expected [batch, bands] = {tuple(np.shape(first.hidden))[:2]}, those of "
                f"the state; received shape {tuple(chunk.shape)}"
            )
        state = _validate.check_state(state, model.num_layers, batch, bands, model.units)
    if reset is not None:
        _check_reset(reset, batch, bands)
        if state is not None:
            state = _reset_state(state, reset)
    return model.apply(variables, state, chunk, seq_lengths=seq_lengths)


def stream_step(model: BandedLSTM) -> StepFn:
    """A jit-compiled streaming step of ``model`` with the state donated.

    The returned function is pure::

        step(variables, state, chunk, reset=None, seq_lengths=None) -> (state, outputs)

    with ``chunk [batch, bands, time, features]`` (``time >= 1``) and
    ``outputs [batch, bands, time, units]``. ``reset``, a bool mask
    ``[batch]`` or ``[batch, bands]``, zeroes those states before the chunk is
    processed, inside the compiled function: changing which streams are reset
    never recompiles. ``seq_lengths`` is passed to ``BandedLSTM`` (pad a chunk
    to a fixed length and mask the padding, as :class:`Stream` does).

    The state's buffers are donated: XLA updates them in place, and the arrays
    passed as ``state`` are deleted by the call. Keep only the returned state,
    and give every field its own buffer, as ``model.initial_state`` does
    (``None`` also starts from zeros, as one more compilation). Shapes
    and dtypes are checked while tracing, so bad input raises ``ValueError`` or
    ``TypeError`` before anything is donated. Each distinct set of shapes and
    dtypes, and ``reset``/``seq_lengths`` given or ``None``, is one compilation.

    >>> import jax, numpy as np
    >>> model = BandedLSTM(units=8)
    >>> chunk = np.ones((2, 3, 1, 4), np.float32)      # [batch, bands, time, features]
    >>> variables = model.init(jax.random.key(0), None, chunk)
    >>> step = stream_step(model)
    >>> state, y = step(variables, model.initial_state(2, 3), chunk)
    >>> state, y = step(variables, state, chunk, np.array([True, False]))  # restart stream 0
    >>> y.shape                                        # [batch, bands, time, units]
    (2, 3, 1, 8)
    """
    return jax.jit(partial(_step, model), donate_argnums=1)


# Compilations are counted with JAX's own monitoring event, fired once per
# backend compilation in the thread that compiles; a thread-local marks which
# stream (if any) is running, so every compilation a stream's methods cause,
# eager operations included, is charged to it.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_running = threading.local()
_listener_lock = threading.Lock()
_listener_registered = False


def _on_event_duration(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    stream = getattr(_running, "stream", None)
    if stream is not None and event == _BACKEND_COMPILE_EVENT:
        stream._compiles += 1


def _register_listener() -> None:
    global _listener_registered
    with _listener_lock:
        if not _listener_registered:
            jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
            _listener_registered = True


def _features(variables: Any, num_layers: int) -> int:
    try:
        return int(variables["params"]["layer_0"]["kernel"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ValueError(
            f"variables: expected BandedLSTM variables, {{'params': {{'layer_0': {{'kernel': "
            f"[features, 4 * units], ...}}, ...}}}} for {num_layers} layer(s); received "
            f"{jax.tree.map(np.shape, variables)}"
        ) from None


def _check_variables(model: BandedLSTM, variables: Any, features: int) -> None:
    """Raises ``ValueError`` unless ``variables`` have the paths and shapes that
    ``model`` makes for ``features`` input features."""
    chunk = jax.ShapeDtypeStruct((1, 1, 1, features), np.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), None, x), chunk)

    def layout(tree):
        return {
            jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    expected, received = layout(expected), layout(variables)
    if expected != received:
        raise ValueError(
            f"variables: expected those of {type(model).__name__}(units={model.units}, "
            f"num_layers={model.num_layers}) for {features} features, {expected}; "
            f"received {received}"
        )


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1; received {value!r}")
    return int(value)


class Stream:
    """A running stream: ``batch_size`` sequences of ``num_bands`` bands, with
    their state carried from call to call on the device.

    ``stream(chunk)`` feeds ``chunk [batch, bands, time, features]`` of any
    ``time >= 1`` and returns the outputs ``[batch, bands, time, units]`` as a
    NumPy array. Chunks longer than ``max_chunk`` are split; a piece of length
    ``t`` is zero-padded up to the smallest bucket length ``>= t`` and the
    padding masked with ``seq_lengths``, so the stream runs only
    ``len(buckets)`` compiled shapes: after :meth:`warmup` no call compiles
    again, whatever the chunk lengths. The model's maths is exactly that of
    ``BandedLSTM``: streaming equals one whole-sequence ``apply``.

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
      buckets: the padded lengths compiled; by default the powers of two below
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
        if not isinstance(model, BandedLSTM):
            raise TypeError(f"model: expected a BandedLSTM; received {type(model).__name__}")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.num_bands = _positive_int(num_bands, "num_bands")
        self.max_chunk = _positive_int(max_chunk, "max_chunk")
        if buckets is None:
            buckets = [2**k for k in range(self.max_chunk.bit_length()) if 2**k < self.max_chunk]
            buckets.append(self.max_chunk)
        buckets = sorted({_positive_int(b, "buckets") for b in buckets})
        if buckets[-1] != self.max_chunk:
            raise ValueError(
                f"buckets: expected lengths up to and including max_chunk = {self.max_chunk}; "
                f"received {buckets}"
            )
        self.buckets = tuple(buckets)
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise TypeError(f"dtype: expected a floating dtype; received {self.dtype}")
        self.features = _features(variables, model.num_layers)
        _check_variables(model, variables, self.features)
        self._model = model
        self._compiles = 0
        _register_listener()
        shape = (self.batch_size, self.num_bands)
        # Checks that the variables fit the model (flax raises otherwise) and
        # gives the state's dtype; traces only, compiles nothing.
        state_struct, _ = jax.eval_shape(
            partial(_step, model),
            variables,
            None,
            jax.ShapeDtypeStruct((*shape, 1, self.features), self.dtype),
        )
        self._state_shape = state_struct[0].hidden.shape
        self._state_dtype = np.dtype(state_struct[0].hidden.dtype)
        self._variables = jax.device_put(variables)
        self._fingerprint: dict[str, Any] | None = None
        self._step = stream_step(model)
        self._snapshot = jax.jit(_reset_state)
        self._no_reset = jax.device_put(np.zeros(shape, np.bool_))
        # For every piece length t: (its bucket, the device-resident
        # seq_lengths that mask the padding, or None for the unmasked bucket 1).
        self._plan = {}
        for t in range(1, self.max_chunk + 1):
            bucket = next(b for b in self.buckets if b >= t)
            lengths = None if bucket == 1 else jax.device_put(np.full(self.batch_size, t, np.int32))
            self._plan[t] = (bucket, lengths)
        self._state = self._zeros()
        self._pending: np.ndarray | None = None

    @contextmanager
    def _counting(self):
        outer = getattr(_running, "stream", None)
        _running.stream = self
        try:
            yield
        finally:
            _running.stream = outer

    def _zeros(self) -> State:
        # One buffer per field: the step donates them, and XLA refuses to
        # donate one buffer twice.
        return tuple(
            LSTMState(
                *(
                    jax.device_put(np.zeros(self._state_shape, self._state_dtype))
                    for _ in LSTMState._fields
                )
            )
            for _ in range(self._model.num_layers)
        )

    @property
    def compile_count(self) -> int:
        """How many XLA compilations this stream's methods have caused so far."""
        return self._compiles

    @property
    def state(self) -> State:
        """A copy of the current state: ``num_layers`` LSTMState, each field
        ``[batch, bands, units]``, with pending resets applied. Later calls
        never invalidate it."""
        with self._counting():
            return self._snapshot(self._state, self._pending_mask())

    def _pending_mask(self) -> jax.Array:
        return self._no_reset if self._pending is None else jax.device_put(self._pending)

    def _check_chunk(self, chunk: Any) -> Any:
        """Returns ``chunk`` as an array of the stream's dtype, or raises."""
        shape = getattr(chunk, "shape", None)
        if shape is None or not hasattr(chunk, "dtype"):
            chunk = np.asarray(chunk)
            shape = chunk.shape
        if (
            len(shape) != 4
            or shape[0] != self.batch_size
            or shape[1] != self.num_bands
            or shape[3] != self.features
        ):
            raise ValueError(
                f"chunk: expected shape [batch, bands, time, features] = ({self.batch_size}, "
                f"{self.num_bands}, time, {self.features}); received {tuple(shape)}"
            )
        if shape[2] < 1:
            raise ValueError(
                "chunk: expected at least one time step; received an empty chunk of shape "
                f"{tuple(shape)}"
            )
        dtype = chunk.dtype
        if dtype != self.dtype and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"chunk: expected a floating dtype; received {dtype}")
        if type(chunk) is np.ndarray:
            return chunk if dtype == self.dtype else chunk.astype(self.dtype)
        if isinstance(chunk, jax.Array) and dtype == self.dtype and shape[2] in self.buckets:
            return chunk  # already on the device, and no padding to do
        return np.asarray(chunk, self.dtype)

    def _reset_mask(self, reset: Any) -> jax.Array:
        """The pending resets and ``reset``, as a device mask ``[batch, bands]``."""
        mask = self._pending
        if reset is not None:
            _check_reset(reset, self.batch_size, self.num_bands)
            shape = (self.batch_size, self.num_bands)
            given = np.broadcast_to(np.asarray(reset).reshape(self.batch_size, -1), shape)
            mask = given if mask is None else mask | given
        return self._no_reset if mask is None else jax.device_put(mask)

    def _run(self, piece: Any, length: int, reset_mask: jax.Array) -> jax.Array:
        """Runs one piece of ``length <= max_chunk`` steps; returns the padded outputs."""
        bucket, lengths = self._plan[length]
        if bucket != length:
            padded = np.zeros((self.batch_size, self.num_bands, bucket, self.features), self.dtype)
            padded[:, :, :length] = piece
            piece = padded
        self._state, out = self._step(self._variables, self._state, piece, reset_mask, lengths)
        self._pending = None
        return out

    def __call__(self, chunk: Any, reset: Any = None) -> np.ndarray:
        """Feeds ``chunk [batch, bands, time, features]`` and returns the outputs
        ``[batch, bands, time, units]`` (NumPy). ``reset``, a bool mask
        ``[batch]`` or ``[batch, bands]``, restarts those streams from zeros
        before the chunk. Bad input raises before the state is touched."""
        chunk = self._check_chunk(chunk)
        if reset is None and self._pending is None:
            reset_mask = self._no_reset
        else:
            reset_mask = self._reset_mask(reset)
        time = chunk.shape[2]
        outer = getattr(_running, "stream", None)
        _running.stream = self
        try:
            if time <= self.max_chunk:
                return np.asarray(self._run(chunk, time, reset_mask))[:, :, :time]
            pieces = []
            for start in range(0, time, self.max_chunk):
                length = min(self.max_chunk, time - start)
                out = self._run(chunk[:, :, start : start + length], length, reset_mask)
                pieces.append((out, length))
                reset_mask = self._no_reset
            return np.concatenate([np.asarray(out)[:, :, :n] for out, n in pieces], axis=2)
        finally:
            _running.stream = outer

    def reset(self, batch: Sequence[int] | None = None) -> None:
        """Restarts sequences from a zero state: all of them, or those at the
        indices ``batch``. Takes effect inside the next compiled call."""
        mask = np.zeros((self.batch_size, self.num_bands), np.bool_)
        if batch is None:
            mask[:] = True
        else:
            indices = list(batch) if isinstance(batch, Sequence | np.ndarray) else [batch]
            for index in indices:
                if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
                    raise TypeError(
                        f"batch: expected integer indices; received {type(index).__name__}"
                    )
                if not 0 <= index < self.batch_size:
                    raise ValueError(
                        f"batch: expected indices in [0, {self.batch_size}); received {indices}"
                    )
            mask[indices] = True
        self._pending = mask if self._pending is None else self._pending | mask

    def warmup(self) -> None:
        """Compiles every bucket and the state snapshot, on a scratch state:
        the stream's own state is left as it is."""
        with self._counting():
            scratch = self._zeros()
            for bucket in self.buckets:
                _, lengths = self._plan[bucket]
                chunk = np.zeros(
                    (self.batch_size, self.num_bands, bucket, self.features), self.dtype
                )
                scratch, out = self._step(self._variables, scratch, chunk, self._no_reset, lengths)
            jax.block_until_ready((self._snapshot(scratch, self._no_reset), out))

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
            path, self._expected_fingerprint(), self._state_shape, self._state_dtype
        )
        self._state = tuple(
            LSTMState(*(jax.device_put(np.array(a)) for a in layer)) for layer in state
        )
        self._pending = None
