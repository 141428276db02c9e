"""The batcher's compiled tick: gather the slots that have a frame, run one
step of the model on them, scatter their new states back.

The state holds ``slots + 1`` rows: the last is a scratch slot that the
padding rows of a tick read and write, so a tick of ``k`` frames runs the
smallest compiled batch size ``>= k`` and never touches a slot without a frame.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .._internal import (
    CompileCounter,
    StreamSpec,
    reset_state,
    stream_apply,
    with_packed_weights,
)
from .._internal import validate as _validate


def default_batch_sizes(num_slots: int) -> tuple[int, ...]:
    """Every size up to 8, then the powers of two below ``num_slots``, and ``num_slots``."""
    sizes = {size for size in range(1, min(num_slots, 8) + 1)}
    sizes |= {2**k for k in range(3, num_slots.bit_length()) if 2**k < num_slots}
    return tuple(sorted(sizes | {num_slots}))


def check_batch_sizes(batch_sizes: Any, num_slots: int) -> tuple[int, ...]:
    """``batch_sizes`` (or the default) as sorted sizes, none above ``num_slots``."""
    if batch_sizes is None:
        return default_batch_sizes(num_slots)
    sizes = sorted({_validate.positive_int(size, "batch_sizes") for size in batch_sizes})
    if not sizes or sizes[-1] > num_slots:
        raise ValueError(
            f"batch_sizes: expected one or more sizes, none above num_slots = {num_slots} (a "
            f"tick runs the smallest size that holds its frames); received {sizes}"
        )
    return tuple(sizes)


def tick_apply(
    model: nn.Module,
    check_finite: bool,
    variables: Any,
    state: Any,
    frames: jax.Array,
    rows: jax.Array,
    fresh: jax.Array,
) -> tuple[Any, jax.Array, jax.Array]:
    """One tick: ``frames [size, bands, time, features]`` for the slots
    ``rows [size]``, those where ``fresh [size]`` is true starting from zeros.

    Returns ``(state, outputs [size, ...], finite [size])``. With
    ``check_finite``, a row whose new state or outputs hold a NaN or an
    infinity keeps the state it had (zeroed, if fresh) and is ``False`` in
    ``finite``; without it, ``finite`` is all true and not computed.
    """
    gathered = reset_state(jax.tree.map(lambda leaf: leaf[rows], state), fresh)
    new, outputs = stream_apply(model, variables, gathered, frames)
    finite = jnp.ones(rows.shape, jnp.bool_)
    if check_finite:
        for leaf in (*jax.tree.leaves(new), outputs):
            finite &= jnp.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=1)
        # A refused row keeps the state it had before the tick (zeroed, if fresh).
        new = jax.tree.map(lambda n, old: jnp.where(_rows_mask(finite, n), n, old), new, gathered)
    state = jax.tree.map(lambda leaf, n: leaf.at[rows].set(n), state, new)
    return state, outputs, finite


def _rows_mask(rows: jax.Array, leaf: jax.Array) -> jax.Array:
    return rows.reshape(rows.shape + (1,) * (leaf.ndim - 1))


class Tick:
    """The compiled ticks of one model: one compilation per batch size, the
    slots' state on the device, and the compile counter they are charged to."""

    def __init__(
        self,
        model: nn.Module,
        variables: Any,
        spec: StreamSpec,
        num_slots: int,
        frame_length: int,
        batch_sizes: tuple[int, ...],
        check_finite: bool,
    ) -> None:
        """``spec`` checked the model for one sequence (``stream_spec``), the
        batcher the rest."""
        self.num_slots, self.batch_sizes, self._spec = num_slots, batch_sizes, spec
        self.frame_shape, self.dtype = (spec.num_bands, frame_length, spec.features), spec.dtype
        self.compiles = CompileCounter()
        one = np.zeros((1, *self.frame_shape), self.dtype)
        with self.compiles:  # the native kernel's weights, packed once
            self._variables = with_packed_weights(model, jax.device_put(variables), one)
        self._apply = partial(tick_apply, model, bool(check_finite))
        self._step = jax.jit(self._apply, donate_argnums=1)
        rows, fresh = self._pad([])
        frames = np.zeros((len(rows), *self.frame_shape), self.dtype)
        outputs = jax.eval_shape(self._apply, self._variables, self.zeros(), frames, rows, fresh)[1]
        self.output_shape = tuple(outputs.shape[1:])
        self.output_dtype = np.dtype(outputs.dtype)
        self.state = self.zeros()
        self._lock = threading.Lock()

    def zeros(self) -> Any:
        """A zero state of ``slots + 1`` rows, every leaf its own device buffer."""
        return jax.tree.map(
            lambda leaf: jax.device_put(
                np.zeros((self.num_slots + 1, *leaf.shape[1:]), leaf.dtype)
            ),
            self._spec.state,
        )

    def size_for(self, count: int) -> int:
        """The batch size a tick of ``count`` frames runs."""
        return next(size for size in self.batch_sizes if size >= count)

    def _pad(self, slots: list[int], fresh: list[bool] | None = None) -> tuple[np.ndarray, ...]:
        """``rows`` and ``fresh`` of a tick of ``slots``, padded with the scratch slot."""
        padding = self.size_for(max(len(slots), 1)) - len(slots)
        rows = np.array([*slots, *[self.num_slots] * padding], np.int32)
        fresh = np.array([*(fresh or [False] * len(slots)), *[True] * padding], np.bool_)
        return rows, fresh

    def run(
        self, slots: list[int], fresh: list[bool], frames: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Runs one tick of ``frames`` (each ``[bands, time, features]``) for
        ``slots``; returns the outputs ``[len(slots), ...]`` and which rows
        were finite, as NumPy."""
        rows, fresh_rows = self._pad(slots, fresh)
        batch = np.zeros((len(rows), *self.frame_shape), self.dtype)
        batch[: len(frames)] = frames
        with self._lock, self.compiles:
            self.state, outputs, finite = self._step(
                self._variables, self.state, batch, rows, fresh_rows
            )
        return np.asarray(outputs)[: len(slots)], np.asarray(finite)[: len(slots)]

    def warmup(self) -> None:
        """Compiles every batch size, on a scratch state."""
        with self.compiles:
            scratch = self.zeros()
            for size in self.batch_sizes:
                rows, fresh = self._pad([self.num_slots] * size)
                frames = np.zeros((size, *self.frame_shape), self.dtype)
                scratch, outputs, _ = self._step(self._variables, scratch, frames, rows, fresh)
            jax.block_until_ready((scratch, outputs))

    def zero_row_state(self) -> Any:
        """The state of a sequence before its first frame: zero leaves ``[bands, ...]``."""
        return jax.tree.map(lambda leaf: np.zeros(leaf.shape[1:], leaf.dtype), self._spec.state)

    def row_state(self, slot: int) -> Any:
        """A NumPy copy of the state of ``slot``: leaves ``[bands, ...]``."""
        with self._lock:  # not while a tick donates the state
            return jax.tree.map(lambda leaf: np.array(np.asarray(leaf)[slot]), self.state)
