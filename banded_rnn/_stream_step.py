"""The pure streaming step: reset some streams, then run one chunk from the carried state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np

from . import _validate
from ._banded import BandedLSTM
from ._state import LSTMState, State, reset_state

StepFn = Callable[..., tuple[State, jax.Array]]


def stream_apply(
    model: BandedLSTM,
    variables: Any,
    state: State | None,
    chunk: jax.Array,
    reset: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
) -> tuple[State, jax.Array]:
    """``model.apply`` on one ``chunk [batch, bands, time >= 1, features]``,
    after zeroing the states where ``reset`` is true. Checks run while tracing,
    before XLA and before any buffer is donated: here what only streaming asks
    (a non-empty chunk of the state's ``[batch, bands]``, the reset mask), the
    state itself in ``model.apply``."""
    chunk = _validate.check_inputs(
        chunk,
        "chunk",
        features=_validate.input_features(variables),
        batch_bands=_state_batch_bands(state),
        nonempty=True,
    )
    batch, bands = chunk.shape[:2]
    if reset is not None:
        _validate.check_batch_mask(reset, batch, bands)
        if state is not None:
            state = reset_state(state, reset)
    return model.apply(variables, state, chunk, seq_lengths=seq_lengths)


def _state_batch_bands(state: Any) -> tuple[int, int] | None:
    """The ``[batch, bands]`` a state carries, which the chunk must match (so that
    a chunk of the wrong size is named, not the state); None if unreadable."""
    first = state[0] if isinstance(state, tuple | list) and state else None
    shape = _validate.shape_of(first.hidden) if isinstance(first, LSTMState) else ()
    return shape[:2] if len(shape) == 3 else None


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
    return jax.jit(partial(stream_apply, model), donate_argnums=1)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a stream of ``model`` is, checked once: ``[batch, bands]``, the
    chunks' features and dtype, and the state's shape and dtype."""

    batch_size: int
    num_bands: int
    features: int
    dtype: np.dtype
    state_shape: tuple[int, int, int]
    state_dtype: np.dtype


def stream_spec(
    model: Any, variables: Any, batch_size: Any, num_bands: Any, dtype: Any
) -> StreamSpec:
    """Checks the arguments every stream of ``model`` takes, or raises."""
    if not isinstance(model, BandedLSTM):
        raise TypeError(f"model: expected a BandedLSTM; received {type(model).__name__}")
    batch_size = _validate.positive_int(batch_size, "batch_size")
    num_bands = _validate.positive_int(num_bands, "num_bands")
    dtype = _validate.floating_dtype(dtype)
    features = _validate.check_variables(model, variables)
    # The state's dtype, from shapes alone: traces, compiles nothing.
    chunk = jax.ShapeDtypeStruct((batch_size, num_bands, 1, features), dtype)
    state, _ = jax.eval_shape(partial(stream_apply, model), variables, None, chunk)
    hidden = state[0].hidden
    return StreamSpec(
        batch_size, num_bands, features, dtype, tuple(hidden.shape), np.dtype(hidden.dtype)
    )
