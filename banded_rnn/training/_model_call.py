"""How the training and evaluation steps call a model: the ``apply_fn`` contract.

A step takes a ``flax.training.train_state.TrainState`` whose ``apply_fn`` is
called as::

    apply_fn({"params": params}, state, inputs, deterministic=...,
             rngs={"dropout": key}, seq_lengths=... or mask=...)
        -> (final_state, outputs)

``BandedLSTM.apply``, or the ``apply`` of any Flax module wrapping it (layers
before and after it, a head) with that signature, where:

* ``inputs`` is ``[batch, bands, time, features]``;
* ``state`` is any pytree of ``[batch, bands, ...]`` arrays, and ``None`` means
  the model's zero state (a step builds zeros shaped like the final state the
  model returns, from shapes alone);
* ``outputs`` is ``[batch, bands, time, ...]`` for per-step targets, or
  ``[batch, ...]`` for one target per sequence;
* ``rngs`` is passed only when a key is given; ``seq_lengths`` or ``mask`` only
  when the batch has them (then ``apply_fn`` must take that keyword);
* with one key per batch entry, the model runs under ``jax.vmap`` over the
  entries, each as a batch of one with its own dropout key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp

from .._internal import forward_chunks, scan_chunks
from .._internal import validate as _validate


def per_entry_keys(rng: Any, batch: int) -> bool:
    """True for one key per batch entry, False for one key or None."""
    return rng is not None and _validate.check_rng(rng, batch)


def call_model(
    apply_fn: Callable[..., Any],
    params: Any,
    state: Any,
    inputs: Any,
    *,
    rng: Any = None,
    per_entry: bool = False,
    deterministic: bool = True,
    valid_steps: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """One call of ``apply_fn`` by the contract above; with ``per_entry`` keys,
    one call per batch entry under vmap. ``valid_steps`` is ``{}``,
    ``{"seq_lengths": ...}`` or ``{"mask": ...}``, each ``[batch, ...]``."""
    variables = {"params": params}
    valid_steps = valid_steps or {}
    if rng is None:
        return apply_fn(variables, state, inputs, deterministic=deterministic, **valid_steps)
    if not _validate.is_typed_key(rng):
        rng = jax.random.wrap_key_data(rng)
    if not per_entry:
        return apply_fn(
            variables, state, inputs, deterministic=deterministic, rngs={"dropout": rng},
            **valid_steps,
        )  # fmt: skip

    def one_entry(entry_state, entry_inputs, key, entry_steps):
        # Each entry runs as a batch of one, with its own dropout key.
        entry_state, entry_steps = jax.tree.map(lambda a: a[None], (entry_state, entry_steps))
        entry_state, outputs = apply_fn(
            variables, entry_state, entry_inputs[None], deterministic=deterministic,
            rngs={"dropout": key}, **entry_steps,
        )  # fmt: skip
        return jax.tree.map(lambda a: a[0], (entry_state, outputs))

    return jax.vmap(one_entry)(state, inputs, rng, valid_steps)


def run_window(
    apply_fn: Callable[..., Any],
    params: Any,
    state: Any,
    inputs: Any,
    *,
    rng: Any,
    per_entry: bool,
    valid_steps: dict[str, Any],
    chunk_length: int | None,
    truncate: bool,
) -> tuple[Any, Any]:
    """Runs ``inputs [batch, bands, time, features]`` in chunks of ``chunk_length``
    steps (whole without it), dropout on.

    The state is carried from chunk to chunk; with ``truncate`` its gradient is
    stopped at every chunk boundary. ``seq_lengths`` count from the window's
    start, so each chunk gets them counted from its own; a ``mask`` is cut
    with the inputs. Returns ``(final_state, outputs)`` with the chunks'
    outputs joined on the time axis (axis 2).
    """

    def run(carry, piece):
        state, start = carry
        x, mask = piece
        if truncate and state is not None:
            state = jax.lax.stop_gradient(state)
        if "seq_lengths" in valid_steps:  # int32 [batch, bands] (no unsigned wrap-around)
            seq_lengths = _validate.check_seq_lengths(valid_steps["seq_lengths"], *inputs.shape[:3])
            piece_steps = {"seq_lengths": jnp.clip(seq_lengths - start, 0, None)}
        else:
            piece_steps = {} if mask is None else {"mask": mask}
        state, outputs = call_model(
            apply_fn, params, state, x, rng=rng, per_entry=per_entry, deterministic=False,
            valid_steps=piece_steps,
        )  # fmt: skip
        return (state, start + x.shape[2]), outputs

    batch, bands, time = inputs.shape[:3]
    mask = valid_steps.get("mask")
    if mask is not None:  # [batch, bands, time], time on the inputs' axis
        mask = _validate.check_mask(mask, batch, bands, time)
    if chunk_length is None or time <= chunk_length:
        (state, _), outputs = run((state, 0), (inputs, valid_steps.get("mask")))
        return state, outputs
    with forward_chunks(f"the training step's chunk_length={chunk_length}"):
        if state is None:  # the model's zeros, as a concrete carry for the scan
            first = (inputs[:, :, :1], None if mask is None else mask[:, :, :1])
            state = zeros_like_final_state(lambda p: run((None, 0), p)[0], first)
        (state, _), outputs = scan_chunks(run, (state, 0), (inputs, mask), chunk_length, axis=2)
    return state, outputs


def zeros_like_final_state(run: Callable[[Any], tuple[Any, Any]], inputs: Any) -> Any:
    """Zeros shaped like the final state ``run(inputs)`` returns, from shapes alone."""
    final_state, _ = jax.eval_shape(run, inputs)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), final_state)


def jit_keeping_chunk_order(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``jax.jit(fn)`` taking a static ``streaming``: the caller's
    ``forward_chunks`` mark, restored while ``fn`` is traced. A loop that
    carries the state from window to window marks its calls, and the mark must
    reach the model's trace, and the cache key, as a model that runs
    backwards refuses it; a trace cached without the mark would not."""

    def run(*args: Any, streaming: str | None = None, **keywords: Any) -> Any:
        with forward_chunks(streaming) if streaming else contextlib.nullcontext():
            return fn(*args, **keywords)

    return jax.jit(run, static_argnames="streaming", **kwargs)


def needs_dropout_rng(apply_fn: Callable[..., Any], params: Any, inputs: Any) -> bool:
    """Whether the model asks for a ``'dropout'`` rng in training on ``inputs``
    (an array or a ``jax.ShapeDtypeStruct``), from shapes alone."""
    try:
        jax.eval_shape(
            lambda p, x: call_model(apply_fn, p, None, x, deterministic=False), params, inputs
        )
    except (ValueError, flax.errors.InvalidRngError):
        return True
    return False
