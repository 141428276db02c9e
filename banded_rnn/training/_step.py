"""Jitted training and evaluation steps for truncated back-propagation through time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from .. import _validate
from .._chunked import scan_chunks
from . import _mesh

LossFn = Callable[[jax.Array, Any], jax.Array]
Metrics = dict[str, jax.Array]
Rng = jax.Array | None


def _per_entry(rng: Any, batch: int) -> bool:
    """True for one key per batch entry, False for one key or None."""
    return rng is not None and _validate.check_rng(rng, batch)


def _apply(apply_fn, params, state, inputs, rng, per_entry, deterministic):
    """One call of ``apply_fn``; with per-entry keys, one call per batch entry under vmap."""
    variables = {"params": params}
    if rng is None:
        return apply_fn(variables, state, inputs, deterministic=deterministic)
    if not _validate.is_typed_key(rng):
        rng = jax.random.wrap_key_data(rng)
    if not per_entry:
        return apply_fn(
            variables, state, inputs, deterministic=deterministic, rngs={"dropout": rng}
        )

    def one_entry(entry_state, entry_inputs, key):
        # Each entry runs as a batch of one, with its own dropout key.
        entry_state = jax.tree.map(lambda a: a[None], entry_state)
        entry_state, outputs = apply_fn(
            variables, entry_state, entry_inputs[None], deterministic=deterministic,
            rngs={"dropout": key},
        )  # fmt: skip
        return jax.tree.map(lambda a: a[0], entry_state), outputs[0]

    return jax.vmap(one_entry)(state, inputs, rng)


def _run_window(apply_fn, params, state, inputs, rng, per_entry, *, chunk_length, truncate):
    """Runs ``inputs [batch, bands, time, features]`` in chunks of ``chunk_length`` steps.

    The state is carried from chunk to chunk; with ``truncate`` its gradient is
    stopped at every chunk boundary. Returns ``(final_state, outputs)`` with the
    chunks' outputs joined on the time axis (axis 2).
    """

    def run(state, x):
        if truncate and state is not None:
            state = jax.lax.stop_gradient(state)
        return _apply(apply_fn, params, state, x, rng, per_entry, deterministic=False)

    if chunk_length is None or inputs.shape[2] <= chunk_length:
        return run(state, inputs)
    if state is None:  # the model's zeros, as a concrete carry for the scan
        state = _zeros_like_final_state(lambda x: run(None, x), inputs[:, :, :1])
    return scan_chunks(run, state, inputs, chunk_length, axis=2)


def _zeros_like_final_state(run: Callable[[Any], tuple[Any, Any]], inputs: Any) -> Any:
    """Zeros shaped like the final state ``run(inputs)`` returns, from shapes alone."""
    final_state, _ = jax.eval_shape(run, inputs)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), final_state)


class _Step:
    """Shared validation, placement and lowering for the training and evaluation steps."""

    training: bool

    def __init__(self, loss_fn: LossFn, mesh: Mesh | None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable; received {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.mesh = None if mesh is None else _mesh.check_mesh(mesh)
        self._checked: set[Any] = set()

    # -- what the loop asks of the model ---------------------------------------------
    def initial_state(self, train_state: TrainState, batch: int, bands: int, features: int) -> Any:
        """The model's state of zeros for ``[batch, bands]`` and ``features``
        input features, from its shapes alone (the model runs nothing); split
        over the step's mesh, if it has one, as the step splits the state."""
        inputs = jax.ShapeDtypeStruct((batch, bands, 1, features), jnp.float32)
        apply_fn, params = train_state.apply_fn, train_state.params
        run = lambda x: _apply(apply_fn, params, None, x, None, False, deterministic=True)  # noqa: E731
        sharding = None if self.mesh is None else _mesh.data_sharding(self.mesh)
        return jax.jit(lambda: _zeros_like_final_state(run, inputs), out_shardings=sharding)()

    @staticmethod
    def needs_rng(train_state: TrainState, inputs: Any) -> bool:
        """Whether the model asks for a ``'dropout'`` rng in training on
        ``inputs`` (an array or a ``jax.ShapeDtypeStruct``), from shapes alone."""
        apply_fn = train_state.apply_fn
        try:
            jax.eval_shape(
                lambda p, x: _apply(apply_fn, p, None, x, None, False, deterministic=False),
                train_state.params, inputs,
            )  # fmt: skip
        except (ValueError, flax.errors.InvalidRngError):
            return True
        return False

    # -- validation -------------------------------------------------------------------
    def check(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        rng: Rng = None,
        *,
        abstract: bool = False,
    ) -> None:
        """Raises ValueError/TypeError for inputs the step cannot take.

        Runs nothing: shapes come from ``jax.eval_shape``. Each signature of
        shapes and dtypes is checked once, then remembered. ``abstract``
        allows ``jax.ShapeDtypeStruct`` s (for :meth:`lower`).
        """
        if not isinstance(train_state, TrainState):
            raise TypeError(
                "train_state: expected a flax.training.train_state.TrainState; "
                f"received {type(train_state).__name__}"
            )
        leaves, treedef = jax.tree.flatten((train_state.params, state, inputs, targets, rng))
        apply_fn = train_state.apply_fn
        try:
            hash(apply_fn)
        except TypeError:
            apply_fn = id(apply_fn)
        signature = (
            abstract,
            treedef,
            apply_fn,
            tuple((_validate.shape_of(a), getattr(a, "dtype", type(a))) for a in leaves),
        )
        if signature in self._checked:
            return
        self._check(train_state, state, inputs, targets, rng, abstract)
        self._checked.add(signature)

    def _check(self, train_state, state, inputs, targets, rng, abstract) -> None:
        inputs = _validate.check_inputs(inputs, nonempty=True, abstract=abstract)
        batch, bands, time, _ = inputs.shape
        if rng is not None:
            _validate.check_rng(rng, batch)
        if self.mesh is not None:
            _mesh.check_divisible(self.mesh, batch, bands)
        apply_fn, params = train_state.apply_fn, train_state.params
        # Shape errors (a state that does not match the batch, wrong features)
        # come from the model itself, traced abstractly.
        final_state, outputs = jax.eval_shape(
            lambda p, s, x: _apply(apply_fn, p, s, x, None, False, deterministic=True),
            params, state, inputs,
        )  # fmt: skip
        if self.training and rng is None and self.needs_rng(train_state, inputs):
            raise ValueError(
                "rng: the model has dropout on (it needs a 'dropout' rng in training) "
                "but rng is None; pass jax.random.key(...), one key per batch entry "
                f"[batch] = ({batch},), or build the model without dropout"
            )
        if state is not None and jax.tree.structure(state) != jax.tree.structure(final_state):
            raise ValueError(
                "state: expected the structure of the model's final state, "
                f"{jax.tree.structure(final_state)}; received {jax.tree.structure(state)}"
            )
        self._check_targets(outputs, targets, batch, bands, time)

    def _check_targets(self, outputs, targets, batch, bands, time) -> None:
        out_shape, target_shape = tuple(outputs.shape), _validate.shape_of(targets)
        lead = (batch, bands, time)
        if target_shape[:3] != lead or (
            len(target_shape) == len(out_shape) and target_shape != out_shape
        ):
            expected = f"{out_shape}" if len(out_shape) > 3 else f"[batch, bands, time] = {lead}"
            raise ValueError(
                f"targets: expected shape [batch, bands, time, ...] matching the outputs "
                f"{expected} (the outputs' shape when of the same rank); received {target_shape}"
            )
        loss = jax.eval_shape(self.loss_fn, outputs, targets)
        if not hasattr(loss, "shape") or loss.shape != ():
            raise ValueError(
                f"loss_fn: expected a scalar loss; received {getattr(loss, 'shape', loss)!r}"
            )

    # -- placement ----------------------------------------------------------------------
    def _under_mesh(self) -> contextlib.AbstractContextManager:
        """Traces under the mesh, so that the native kernel (which XLA cannot
        partition) runs in ``shard_map``, each device on its own rows."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def place(self, train_state: TrainState, state: Any = None) -> tuple[TrainState, Any]:
        """``train_state`` replicated and ``state`` split over the step's mesh,
        as the step lays them out (unchanged without a mesh). With several
        processes every process passes the same values (fresh parameters made
        from the same key, say) and gets global arrays; :class:`Checkpointer`
        restores onto the layout of what it is given, so place its templates."""
        return self._place(train_state, state, None, None, None)[:2]

    def _place(self, train_state, state, inputs, targets, rng):
        if self.mesh is None:
            return train_state, state, inputs, targets, rng
        data = _mesh.data_sharding(self.mesh)
        per_entry = rng is not None and _per_entry(rng, _validate.shape_of(inputs)[0])
        keys = _mesh.key_sharding(self.mesh) if per_entry else _mesh.replicated(self.mesh)
        return (
            _mesh.place(train_state, _mesh.replicated(self.mesh)),
            None if state is None else _mesh.place(state, data),
            None if inputs is None else _mesh.place(inputs, data),
            None if targets is None else _mesh.place(targets, data),
            None if rng is None else _mesh.place(rng, keys),
        )


class TrainStep(_Step):
    """``(train_state, state, inputs, targets, rng) -> (train_state, state, metrics)``.

    Made by :func:`make_train_step`; see there. ``lower(...)`` takes the same
    arguments and returns the jitted step's ``jax.stages.Lowered`` (for
    ``.compile().memory_analysis()``); ``check(...)`` validates without running.
    """

    training = True

    def __init__(self, loss_fn, *, truncate: bool, chunk_length: int | None, mesh: Mesh | None):
        super().__init__(loss_fn, mesh)
        self.chunk_length = _validate.positive_int(chunk_length, "chunk_length", optional=True)
        self.truncate = bool(truncate)
        kwargs: dict[str, Any] = {"donate_argnums": 0}
        if self.mesh is not None:
            replicated = _mesh.replicated(self.mesh)
            kwargs["out_shardings"] = (replicated, _mesh.data_sharding(self.mesh), replicated)
        self._jitted = jax.jit(self._update, **kwargs)

    def _update(self, train_state, state, inputs, targets, rng):
        per_entry = _per_entry(rng, inputs.shape[0])

        def loss_of(params):
            final_state, outputs = _run_window(
                train_state.apply_fn, params, state, inputs, rng, per_entry,
                chunk_length=self.chunk_length, truncate=self.truncate,
            )  # fmt: skip
            return self.loss_fn(outputs, targets), final_state

        (loss, final_state), grads = jax.value_and_grad(loss_of, has_aux=True)(train_state.params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        # A window whose loss or gradient is not finite would make every
        # parameter NaN: it changes nothing but the step count (as
        # optax.apply_if_finite does), and its state is the one it started from.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        updated = train_state.apply_gradients(grads=grads)
        kept = train_state.replace(step=updated.step)
        start = jax.tree.map(jnp.zeros_like, final_state) if state is None else state
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        return keep(updated, kept), keep(final_state, start), metrics

    def __call__(
        self, train_state: TrainState, state: Any, inputs: Any, targets: Any, rng: Rng = None
    ) -> tuple[TrainState, Any, Metrics]:
        self.check(train_state, state, inputs, targets, rng)
        with self._under_mesh():
            return self._jitted(*self._place(train_state, state, inputs, targets, rng))

    def lower(
        self, train_state: TrainState, state: Any, inputs: Any, targets: Any, rng: Rng = None
    ) -> jax.stages.Lowered:
        self.check(train_state, state, inputs, targets, rng, abstract=True)
        with self._under_mesh():
            return self._jitted.lower(*self._place(train_state, state, inputs, targets, rng))


class EvalStep(_Step):
    """``(train_state, state, inputs, targets) -> (state, metrics)``, dropout off.

    Made by :func:`make_eval_step`; nothing is donated.
    """

    training = False

    def __init__(self, loss_fn, *, mesh: Mesh | None):
        super().__init__(loss_fn, mesh)
        kwargs: dict[str, Any] = {}
        if self.mesh is not None:
            replicated = _mesh.replicated(self.mesh)
            kwargs["out_shardings"] = (_mesh.data_sharding(self.mesh), replicated)
        self._jitted = jax.jit(self._evaluate, **kwargs)

    def without_mesh(self) -> EvalStep:
        """This step without its mesh (made once): for a batch the mesh cannot
        split, run whole on every process from host copies of the weights."""
        if self.mesh is None:
            return self
        if not hasattr(self, "_unsplit"):
            self._unsplit = EvalStep(self.loss_fn, mesh=None)
        return self._unsplit

    def _evaluate(self, train_state, state, inputs, targets):
        final_state, outputs = _apply(
            train_state.apply_fn, train_state.params, state, inputs, None, False, deterministic=True
        )
        return final_state, {"loss": self.loss_fn(outputs, targets)}

    def __call__(
        self, train_state: TrainState, state: Any, inputs: Any, targets: Any
    ) -> tuple[Any, Metrics]:
        self.check(train_state, state, inputs, targets)
        with self._under_mesh():
            return self._jitted(*self._place(train_state, state, inputs, targets, None)[:4])


def make_train_step(
    loss_fn: LossFn,
    *,
    truncate: bool = True,
    mesh: Mesh | None = None,
    chunk_length: int | None = None,
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
      ``outputs`` must be ``[batch, bands, time, ...]``. Its buffers are donated:
      use the returned one.
    * ``state`` is the model's state (for ``BandedLSTM``, a tuple of
      ``LSTMState``, each field ``[batch, bands, units]``), or None for zeros.
      Gradients never flow into it: the step is a boundary of the truncation.
    * ``targets`` is ``[batch, bands, time, ...]``; if it has the outputs' rank
      it must have the outputs' shape.
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
      loss_fn: ``loss_fn(outputs, targets) -> scalar``.
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
    return TrainStep(loss_fn, truncate=truncate, chunk_length=chunk_length, mesh=mesh)


def make_eval_step(loss_fn: LossFn, *, mesh: Mesh | None = None) -> EvalStep:
    """Builds a jitted evaluation step ``(train_state, state, inputs, targets) ->
    (state, metrics)``: the model runs with dropout off from ``state``, and
    ``metrics`` is ``{"loss": loss_fn(outputs, targets)}``. Arguments and the
    ``apply_fn`` contract are those of :func:`make_train_step`.

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
    return EvalStep(loss_fn, mesh=mesh)
