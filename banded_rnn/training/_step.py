"""The jitted training and evaluation steps (made by :mod:`._make`): checked,
placed on the step's mesh, then run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from .._internal import chunks_in_time_order
from .._internal import validate as _validate
from . import _mesh
from ._checks import StepChecks
from ._model_call import (
    call_model,
    jit_keeping_chunk_order,
    needs_dropout_rng,
    per_entry_keys,
    run_window,
    zeros_like_final_state,
)
from ._targets import (
    EXTRAS,
    TARGETS_PER,
    call_loss,
    given_extras,
    loss_mask,
    masked_sum,
    step_keywords,
)

LossFn = Callable[[jax.Array, Any], jax.Array]
Metrics = dict[str, jax.Array]
Rng = jax.Array | None
RESERVED = ("loss", "count", "step")
"""Names a metric cannot take: the evaluation's own, and ``fit``'s ``eval_step``."""


class _Step:
    """What the training and evaluation steps share: their settings, the
    model's zero state, the checks and the placement on the mesh."""

    training: bool

    def __init__(
        self,
        loss_fn: LossFn,
        mesh: Mesh | None,
        *,
        targets_per: str = "step",
        metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable; received {type(loss_fn).__name__}")
        if not isinstance(targets_per, str) or targets_per not in TARGETS_PER:
            raise ValueError(
                f"targets_per: expected one of {TARGETS_PER}; received {targets_per!r}"
            )
        metrics = dict(metrics or {})
        for name, fn in metrics.items():
            if not isinstance(name, str) or name in RESERVED or not callable(fn):
                raise TypeError(
                    "metrics: expected {name: fn(outputs, targets) -> per-target values}, names "
                    f"other than {RESERVED}; received {name!r}: {type(fn).__name__}"
                )
        self.loss_fn = loss_fn
        self.targets_per = targets_per
        self.metrics = metrics
        self.mesh = None if mesh is None else _mesh.check_mesh(mesh)
        self._agreed: set[Any] = set()  # signatures whose host values the processes agreed on
        self._checks = StepChecks(loss_fn, targets_per, metrics, self.mesh, training=self.training)

    # -- what the loop asks of the model ---------------------------------------------
    def initial_state(self, train_state: TrainState, batch: int, bands: int, features: int) -> Any:
        """The model's state of zeros for ``[batch, bands]`` and ``features``
        input features, from its shapes alone (the model runs nothing); split
        over the step's mesh, if it has one, as the step splits the state."""
        inputs = jax.ShapeDtypeStruct((batch, bands, 1, features), jnp.float32)
        apply_fn, params = train_state.apply_fn, train_state.params
        sharding = None if self.mesh is None else _mesh.data_sharding(self.mesh)
        return jax.jit(
            lambda: zeros_like_final_state(lambda x: call_model(apply_fn, params, None, x), inputs),
            out_shardings=sharding,
        )()

    @staticmethod
    def needs_rng(train_state: TrainState, inputs: Any) -> bool:
        """Whether the model asks for a ``'dropout'`` rng in training on
        ``inputs`` (an array or a ``jax.ShapeDtypeStruct``), from shapes alone."""
        return needs_dropout_rng(train_state.apply_fn, train_state.params, inputs)

    def check(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        rng: Rng = None,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
        ends: Any = None,
        abstract: bool = False,
    ) -> None:
        """Raises ValueError/TypeError for inputs the step cannot take; runs
        nothing (:class:`~._checks.StepChecks`). ``abstract`` allows
        ``jax.ShapeDtypeStruct`` s (for ``lower``)."""
        extras = (seq_lengths, mask, ends)
        self._checks.check(train_state, state, inputs, targets, rng, extras, abstract=abstract)

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

    def _prepare(self, train_state, state, inputs, targets, rng, extras, *, abstract=False):
        """Checks a call, then lays its arguments out as the jitted step takes
        them: ``(train_state, state, inputs, targets, rng)``, and the given
        ``extras`` as keywords."""
        extras = tuple(e if e is None or hasattr(e, "shape") else np.asarray(e) for e in extras)
        self._checks.check(train_state, state, inputs, targets, rng, extras, abstract=abstract)
        if self.mesh is None and isinstance(inputs, jax.Array):
            # The jitted step would trace, then refuse arrays on different
            # devices naming its own arguments (a NumPy batch goes anywhere).
            _validate.check_devices(
                train_state=train_state, state=state, inputs=inputs, targets=targets, rng=rng
            )
        *placed, extras = self._place(train_state, state, inputs, targets, rng, extras)
        return placed, given_extras(extras)

    def _place(self, train_state, state, inputs, targets, rng, extras=(None, None, None)):
        if self.mesh is None:
            return train_state, state, inputs, targets, rng, extras
        if _mesh.spans_processes(self.mesh):
            named = {"train_state": train_state, "state": state, "inputs": inputs}
            named.update({"targets": targets, "rng": rng})
            named.update(zip(EXTRAS, extras, strict=True))
            # The processes' host values are compared on the first call of each
            # signature: a gather between processes costs some milliseconds (3.3
            # ms a call measured between two processes on loopback).
            signature = (
                jax.tree.structure(named),
                tuple(
                    (_validate.shape_of(leaf), _validate.dtype_of(leaf))
                    for leaf in jax.tree.leaves(named)
                ),
            )
            if signature not in self._agreed:
                _mesh.check_same_on_every_process(named)
                self._agreed.add(signature)
        data = _mesh.data_sharding(self.mesh)
        rows = _mesh.key_sharding(self.mesh)  # [batch, ...] on "batch" alone
        per_entry = rng is not None and per_entry_keys(rng, _validate.shape_of(inputs)[0])
        keys = rows if per_entry else _mesh.replicated(self.mesh)
        target_sharding = rows if self.targets_per == "sequence" else data
        return (
            _mesh.place(train_state, _mesh.replicated(self.mesh)),
            None if state is None else _mesh.place(state, data),
            None if inputs is None else _mesh.place(inputs, data),
            None if targets is None else _mesh.place(targets, target_sharding),
            None if rng is None else _mesh.place(rng, keys),
            _mesh.place(extras, rows),
        )


class TrainStep(_Step):
    """``(train_state, state, inputs, targets, rng, *, seq_lengths, mask, ends)
    -> (train_state, state, metrics)``.

    Made by :func:`~banded_rnn.training.make_train_step`; see there.
    ``lower(...)`` takes the same arguments and returns the jitted step's
    ``jax.stages.Lowered`` (for ``.compile().memory_analysis()``);
    ``check(...)`` validates without running.
    """

    training = True

    def __init__(
        self,
        loss_fn,
        *,
        truncate: bool,
        chunk_length: int | None,
        mesh: Mesh | None,
        targets_per: str = "step",
    ):
        super().__init__(loss_fn, mesh, targets_per=targets_per)
        self.chunk_length = _validate.positive_int(chunk_length, "chunk_length", optional=True)
        if self.chunk_length is not None and targets_per == "sequence":
            raise ValueError(
                "chunk_length: runs the window in chunks whose outputs are joined on the "
                "time axis, and with targets_per='sequence' the outputs have none; leave it "
                "None (BandedLSTM(remat_chunk=...) bounds the memory of long windows instead)"
            )
        self.truncate = bool(truncate)
        kwargs: dict[str, Any] = {"donate_argnums": 0}
        if self.mesh is not None:
            replicated = _mesh.replicated(self.mesh)
            kwargs["out_shardings"] = (replicated, _mesh.data_sharding(self.mesh), replicated)
        self._jitted = jit_keeping_chunk_order(self._update, **kwargs)

    def _update(
        self, train_state, state, inputs, targets, rng, seq_lengths=None, mask=None, ends=None
    ):
        valid_steps = step_keywords(seq_lengths, mask)
        counted = loss_mask(self.targets_per, valid_steps, ends, *inputs.shape[:3])

        def loss_of(params):
            final_state, outputs = run_window(
                train_state.apply_fn, params, state, inputs,
                rng=rng, per_entry=per_entry_keys(rng, inputs.shape[0]),
                valid_steps=valid_steps, chunk_length=self.chunk_length, truncate=self.truncate,
            )  # fmt: skip
            return call_loss(self.loss_fn, outputs, targets, counted), final_state

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
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        rng: Rng = None,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
        ends: Any = None,
    ) -> tuple[TrainState, Any, Metrics]:
        placed, keywords = self._prepare_training(
            train_state, state, inputs, targets, rng, (seq_lengths, mask, ends)
        )
        with self._under_mesh():
            return self._jitted(*placed, **keywords, streaming=chunks_in_time_order())

    def lower(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        rng: Rng = None,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
        ends: Any = None,
    ) -> jax.stages.Lowered:
        placed, keywords = self._prepare_training(
            train_state, state, inputs, targets, rng, (seq_lengths, mask, ends), abstract=True
        )
        with self._under_mesh():
            return self._jitted.lower(*placed, **keywords, streaming=chunks_in_time_order())

    def _prepare_training(self, train_state, state, inputs, targets, rng, extras, **kwargs):
        if targets is None:
            raise ValueError(
                "targets: the training step needs the targets of the loss; received None "
                "(make_eval_step(...).predict runs a model without targets)"
            )
        return self._prepare(train_state, state, inputs, targets, rng, extras, **kwargs)


class EvalStep(_Step):
    """``(train_state, state, inputs, targets, *, seq_lengths, mask, ends) ->
    (state, metrics)``, dropout off; ``predict(train_state, state, inputs, *,
    seq_lengths, mask) -> (state, outputs)``.

    Made by :func:`~banded_rnn.training.make_eval_step`; nothing is donated.
    """

    training = False

    def __init__(
        self,
        loss_fn,
        *,
        mesh: Mesh | None,
        targets_per: str = "step",
        metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
    ):
        super().__init__(loss_fn, mesh, targets_per=targets_per, metrics=metrics)
        kwargs: dict[str, Any] = {}
        if self.mesh is not None:
            replicated = _mesh.replicated(self.mesh)
            kwargs["out_shardings"] = (_mesh.data_sharding(self.mesh), replicated)
        self._jitted = jit_keeping_chunk_order(self._evaluate, **kwargs)
        self._predict = jit_keeping_chunk_order(self._outputs)

    def without_mesh(self) -> EvalStep:
        """This step without its mesh (made once): for a batch the mesh cannot
        split, run whole on every process from host copies of the weights."""
        if self.mesh is None:
            return self
        if not hasattr(self, "_unsplit"):
            self._unsplit = EvalStep(
                self.loss_fn, mesh=None, targets_per=self.targets_per, metrics=self.metrics
            )
        return self._unsplit

    def _outputs(self, train_state, state, inputs, seq_lengths=None, mask=None):
        return call_model(
            train_state.apply_fn, train_state.params, state, inputs,
            valid_steps=step_keywords(seq_lengths, mask),
        )  # fmt: skip

    def _evaluate(
        self, train_state, state, inputs, targets, seq_lengths=None, mask=None, ends=None
    ):
        final_state, outputs = self._outputs(train_state, state, inputs, seq_lengths, mask)
        valid_steps = step_keywords(seq_lengths, mask)
        counted = loss_mask(self.targets_per, valid_steps, ends, *inputs.shape[:3])
        lead = (inputs.shape[0],) if self.targets_per == "sequence" else inputs.shape[:3]
        count = jnp.sum(counted, dtype=jnp.float32) if counted is not None else float(np.prod(lead))
        metrics = {"loss": call_loss(self.loss_fn, outputs, targets, counted), "count": count}
        for name, fn in self.metrics.items():
            total, weight = masked_sum(fn(outputs, targets), counted)
            metrics[name] = total / jnp.maximum(weight, 1.0)
        return final_state, metrics

    def __call__(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        targets: Any,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
        ends: Any = None,
    ) -> tuple[Any, Metrics]:
        if targets is None:
            raise ValueError(
                "targets: the evaluation step needs the targets of the loss; received None "
                "(its predict(...) runs the model without targets)"
            )
        extras = (seq_lengths, mask, ends)
        placed, keywords = self._prepare(train_state, state, inputs, targets, None, extras)
        with self._under_mesh():
            return self._jitted(*placed[:4], **keywords, streaming=chunks_in_time_order())

    def predict(
        self,
        train_state: TrainState,
        state: Any,
        inputs: Any,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
    ) -> tuple[Any, Any]:
        """The model's ``(final_state, outputs)`` on ``inputs``, dropout off."""
        extras = (seq_lengths, mask, None)
        placed, keywords = self._prepare(train_state, state, inputs, None, None, extras)
        with self._under_mesh():
            return self._predict(*placed[:3], **keywords, streaming=chunks_in_time_order())
