"""The factories of the jitted steps: :func:`make_train_step` and :func:`make_eval_step`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from ._step import EvalStep, LossFn, TrainStep


def make_train_step(
    loss_fn: LossFn,
    *,
    truncate: bool = True,
    mesh: Mesh | None = None,
    chunk_length: int | None = None,
    targets_per: str = "step",
) -> TrainStep:
    """Builds a jitted training step for truncated back-propagation through time.

    The step is ``(train_state, state, inputs, targets, rng) -> (train_state,
    state, metrics)``: it runs the model on ``inputs [batch, bands, time,
    features]`` from the carried ``state``, computes ``loss_fn(outputs,
    targets)``, applies one optimiser update, and returns the updated training
    state, the final state to carry into the next call, and ``metrics``
    (``{"loss", "grad_norm"}``, scalars of the window before the update).
    A window whose loss or gradient norm is NaN or infinite is not applied:
    the parameters and the optimiser state come back unchanged (only
    ``step`` advances, the window having been consumed), the state returned
    is the one passed in, and the metrics show the non-finite values.

    What the step relies on:

    * ``train_state`` is a ``flax.training.train_state.TrainState`` whose
      ``apply_fn`` is called as ``apply_fn({"params": params}, state, inputs,
      deterministic=..., rngs={"dropout": key}) -> (final_state, outputs)``:
      ``BandedLSTM.apply``, or the ``apply`` of any Flax module wrapping it (a
      head, say) with that signature. ``state=None`` must mean zeros, and
      ``outputs`` must be ``[batch, bands, time, ...]`` (per-step targets) or
      ``[batch, ...]`` (per-sequence targets). Its buffers are donated: use
      the returned one.
    * ``state`` is the model's state (for ``BandedLSTM``, a tuple of
      ``LSTMState``, each field ``[batch, bands, units]``), or None for zeros.
      Gradients never flow into it: the step is a boundary of the truncation.
    * ``targets`` is ``[batch, bands, time, ...]`` with ``targets_per="step"``
      (sequence to sequence), or ``[batch, ...]`` with ``"sequence"`` (one
      label or value per sequence, e.g. ``[batch]`` class indices or ``[batch,
      bands]``, for a model whose outputs come from the state after each
      sequence's last valid step); if it has the outputs' rank it must have
      the outputs' shape. Mismatches are named before the loss runs.
    * ``seq_lengths`` (``[batch]`` or ``[batch, bands]`` integers) or ``mask``
      (``[batch, time]`` or ``[batch, bands, time]`` bools), optional, say which
      steps of the window are valid: they go to ``apply_fn`` as keywords of
      those names (``BandedLSTM`` freezes the state past them and outputs
      zeros), counted from the window's start, and the loss is then called as
      ``loss_fn(outputs, targets, mask)`` with the ``[batch, bands, time]``
      bools of the steps that count (per-step targets), so that padding
      never counts: :func:`masked_mean` makes such a loss.
    * ``ends`` (``[batch]`` bools, per-sequence targets only), optional, says
      in which entries the sequence ends within this window, so that its
      label counts (with truncated BPTT, a label belongs to its sequence's
      last window); the loss is then called with ``mask=ends``. Without it,
      every entry's label counts.
    * ``rng`` is the dropout key. The model draws one dropout mask per
      (sequence, band) and keeps it for every time step, so to train a sequence
      chunk by chunk exactly as if it ran whole, pass the **same** key for all
      the chunks of a sequence. Give one key (shape ``()``) for the whole batch,
      or one key per batch entry (``[batch]``, one per sequence: entries can
      then start new sequences independently; the model then runs under
      ``vmap`` over the entries). ``None`` is allowed when the model has no
      dropout.

    Everything is validated before the donated jitted call (once per
    signature of shapes), so a bad call raises ``ValueError`` or ``TypeError``
    and leaves the caller's buffers intact.

    Args:
      loss_fn: ``loss_fn(outputs, targets) -> scalar``, or ``loss_fn(outputs,
        targets, mask)`` for batches with ``seq_lengths``, ``mask`` or ``ends``.
      truncate: with ``chunk_length``, stop the state's gradient at the boundaries of
        the chunks inside the step (truncated BPTT); False back-propagates
        through the whole window, exactly as if it ran in one piece.
      mesh: a mesh with the axes ``"batch"`` (and optionally ``"bands"``), as
        :func:`make_mesh` builds: inputs, targets, state and per-entry keys are
        split along them and the parameters and optimiser state replicated.
        A mesh may span several processes (``jax.distributed``): each process
        then passes either the whole global batch (NumPy, the same on every
        process) or global arrays made from its own rows by
        :func:`global_batch`.
      chunk_length: if set, the step runs its window in chunks of this many steps
        inside the one jitted call, carrying the state from chunk to chunk (a
        shorter last chunk takes the remainder). None runs the window whole.
      targets_per: ``"step"`` (a target per time step) or ``"sequence"`` (one
        per sequence).

    For long windows, build the model with ``BandedLSTM(..., remat_chunk=K)``:
    the backward pass then keeps the state only every ``K`` steps and
    recomputes the rest, cutting the step's memory at the same gradients.

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax.training.train_state import TrainState
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> x = jnp.ones((2, 3, 16, 4))                    # [batch, bands, time, features]
    >>> y = jnp.zeros((2, 3, 16, 8))                   # [batch, bands, time, units]
    >>> params = model.init(jax.random.key(0), None, x)["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    >>> step = make_train_step(lambda out, target: jnp.mean((out - target) ** 2))
    >>> state = model.initial_state(2, 3)
    >>> for chunk in range(2):                         # two chunks of 8 steps, state carried
    ...     window = slice(8 * chunk, 8 * chunk + 8)
    ...     train_state, state, metrics = step(
    ...         train_state, state, x[:, :, window], y[:, :, window], jax.random.key(1))
    >>> int(train_state.step), state[0].hidden.shape   # per layer: [batch, bands, units]
    (2, (2, 3, 8))
    """
    return TrainStep(
        loss_fn, truncate=truncate, chunk_length=chunk_length, mesh=mesh, targets_per=targets_per
    )


def make_eval_step(
    loss_fn: LossFn,
    *,
    mesh: Mesh | None = None,
    targets_per: str = "step",
    metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
) -> EvalStep:
    """Builds a jitted evaluation step ``(train_state, state, inputs, targets,
    *, seq_lengths=None, mask=None, ends=None) -> (state, metrics)``: the model
    runs with dropout off from ``state``, and ``metrics`` holds ``"loss"``,
    ``"count"`` (how many targets counted: valid ``(entry, band, step)``
    triples per step, entries per sequence) and, for every ``name: fn`` of
    ``metrics``, the mean of ``fn(outputs, targets)`` (values per target, e.g.
    :func:`accuracy`) over the targets that count. Arguments and the
    ``apply_fn`` contract are those of :func:`make_train_step`. Its
    ``predict(train_state, state, inputs, *, seq_lengths=None, mask=None)``
    returns the model's ``(final_state, outputs)``.

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax.training.train_state import TrainState
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> x, y = jnp.ones((2, 3, 16, 4)), jnp.zeros((2, 3, 16, 8))
    >>> params = model.init(jax.random.key(0), None, x)["params"]
    >>> train_state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    >>> evaluate = make_eval_step(lambda out, target: jnp.mean((out - target) ** 2))
    >>> state, metrics = evaluate(train_state, None, x[:, :, :8], y[:, :, :8])
    >>> state, metrics = evaluate(train_state, state, x[:, :, 8:], y[:, :, 8:])  # carried
    >>> metrics["loss"].shape
    ()
    """
    return EvalStep(loss_fn, mesh=mesh, targets_per=targets_per, metrics=metrics)
