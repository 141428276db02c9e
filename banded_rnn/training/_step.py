"""Jitted training and evaluation steps for truncated back-propagation through time."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from .._internal import chunks_in_time_order, forward_chunks, scan_chunks
from .._internal import validate as _validate
from . import _mesh

LossFn = Callable[[jax.Array, Any], jax.Array]
Metrics = dict[str, jax.Array]
Rng = jax.Array | None
TARGETS_PER = ("step", "sequence")
"""What a target belongs to: each time step, or each sequence (from its final state)."""
RESERVED = ("loss", "count", "step")
"""Names a metric cannot take: the evaluation's own, and ``fit``'s ``eval_step``."""


def _per_entry(rng: Any, batch: int) -> bool:
    """True for one key per batch entry, False for one key or None."""
    return rng is not None and _validate.check_rng(rng, batch)


def _apply(apply_fn, params, state, inputs, rng, per_entry, deterministic, lengths=None):
    """One call of ``apply_fn``; with per-entry keys, one call per batch entry
    under vmap. ``lengths`` is ``{}``, ``{"seq_lengths": ...}`` or ``{"mask":
    ...}``: keyword arguments for ``apply_fn``, each ``[batch, ...]``."""
    variables = {"params": params}
    lengths = lengths or {}
    if rng is None:
        return apply_fn(variables, state, inputs, deterministic=deterministic, **lengths)
    if not _validate.is_typed_key(rng):
        rng = jax.random.wrap_key_data(rng)
    if not per_entry:
        return apply_fn(
            variables, state, inputs, deterministic=deterministic, rngs={"dropout": rng},
            **lengths,
        )  # fmt: skip

    def one_entry(entry_state, entry_inputs, key, entry_lengths):
        # Each entry runs as a batch of one, with its own dropout key.
        entry_state, entry_lengths = jax.tree.map(lambda a: a[None], (entry_state, entry_lengths))
        entry_state, outputs = apply_fn(
            variables, entry_state, entry_inputs[None], deterministic=deterministic,
            rngs={"dropout": key}, **entry_lengths,
        )  # fmt: skip
        return jax.tree.map(lambda a: a[0], (entry_state, outputs))

    return jax.vmap(one_entry)(state, inputs, rng, lengths)


def _run_window(
    apply_fn, params, state, inputs, rng, per_entry, lengths, *, chunk_length, truncate
):
    """Runs ``inputs [batch, bands, time, features]`` in chunks of ``chunk_length`` steps.

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
        if "seq_lengths" in lengths:  # int32 [batch, bands] (no unsigned wrap-around)
            seq_lengths = _validate.check_seq_lengths(lengths["seq_lengths"], *inputs.shape[:3])
            piece_lengths = {"seq_lengths": jnp.clip(seq_lengths - start, 0, None)}
        else:
            piece_lengths = {} if mask is None else {"mask": mask}
        state, outputs = _apply(apply_fn, params, state, x, rng, per_entry, False, piece_lengths)
        return (state, start + x.shape[2]), outputs

    batch, bands, time = inputs.shape[:3]
    mask = lengths.get("mask")
    if mask is not None:  # [batch, bands, time], time on the inputs' axis
        mask = _validate.check_mask(mask, batch, bands, time)
    if chunk_length is None or time <= chunk_length:
        (state, _), outputs = run((state, 0), (inputs, lengths.get("mask")))
        return state, outputs
    with forward_chunks(f"the training step's chunk_length={chunk_length}"):
        if state is None:  # the model's zeros, as a concrete carry for the scan
            first = (inputs[:, :, :1], None if mask is None else mask[:, :, :1])
            state = _zeros_like_final_state(lambda p: run((None, 0), p)[0], first)
        (state, _), outputs = scan_chunks(run, (state, 0), (inputs, mask), chunk_length, axis=2)
    return state, outputs


def _zeros_like_final_state(run: Callable[[Any], tuple[Any, Any]], inputs: Any) -> Any:
    """Zeros shaped like the final state ``run(inputs)`` returns, from shapes alone."""
    final_state, _ = jax.eval_shape(run, inputs)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), final_state)


def _loss_mask(targets_per, lengths, ends, batch, bands, time):
    """The targets that count, for the loss and the metrics: per step,
    ``[batch, bands, time]`` bools from ``seq_lengths`` or ``mask``; per
    sequence, ``ends [batch]``; None when all of them count."""
    if targets_per == "sequence":
        return ends
    if "seq_lengths" in lengths:
        valid = _validate.check_seq_lengths(lengths["seq_lengths"], batch, bands, time)
        return jnp.arange(time)[None, None, :] < valid[..., None]
    if "mask" in lengths:
        return _validate.check_mask(lengths["mask"], batch, bands, time)
    return None


def _call_loss(loss_fn, outputs, targets, mask):
    return loss_fn(outputs, targets) if mask is None else loss_fn(outputs, targets, mask)


def _takes_mask(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn(outputs, targets, mask)`` is a valid call."""
    try:
        inspect.signature(loss_fn).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): let the call decide
        return True
    return True


class _Step:
    """Shared validation, placement and lowering for the training and evaluation steps."""

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
        seq_lengths: Any = None,
        mask: Any = None,
        ends: Any = None,
        abstract: bool = False,
    ) -> None:
        """Raises ValueError/TypeError for inputs the step cannot take.

        Runs nothing: shapes come from ``jax.eval_shape``. Each signature of
        shapes and dtypes is checked once, then remembered. ``abstract``
        allows ``jax.ShapeDtypeStruct`` s (for :meth:`lower`). ``targets=None``
        checks a call without targets (:meth:`EvalStep.predict`).
        """
        if not isinstance(train_state, TrainState):
            raise TypeError(
                "train_state: expected a flax.training.train_state.TrainState; "
                f"received {type(train_state).__name__}"
            )
        extras = (seq_lengths, mask, ends)
        leaves, treedef = jax.tree.flatten(
            (train_state.params, state, inputs, targets, rng, extras)
        )
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
        if isinstance(seq_lengths, np.ndarray) and np.any(seq_lengths < 0):
            # Host values, checked on every call (device arrays are not read).
            raise ValueError(f"seq_lengths: expected lengths >= 0; received {seq_lengths}")
        if signature in self._checked:
            return
        self._check(train_state, state, inputs, targets, rng, extras, abstract)
        self._checked.add(signature)

    def _check(self, train_state, state, inputs, targets, rng, extras, abstract) -> None:
        inputs = _validate.check_inputs(inputs, nonempty=True, abstract=abstract)
        batch, bands, time, _ = inputs.shape
        if rng is not None:
            _validate.check_rng(rng, batch)
        if self.mesh is not None:
            _mesh.check_divisible(self.mesh, batch, bands)
        lengths = self._check_lengths(*extras, batch, bands, time)
        apply_fn, params = train_state.apply_fn, train_state.params
        # Shape errors (a state that does not match the batch, wrong features)
        # come from the model itself, traced abstractly.
        try:
            final_state, outputs = jax.eval_shape(
                lambda p, s, x, n: _apply(apply_fn, p, s, x, None, False, True, n),
                params, state, inputs, lengths,
            )  # fmt: skip
        except TypeError as error:
            for name in lengths:
                if "unexpected keyword argument" in str(error) and name in str(error):
                    raise TypeError(
                        f"{name}: the model's apply_fn does not take {name}= ({error}); give "
                        "the model's __call__ that keyword (BandedLSTM takes seq_lengths "
                        "and mask) to train on padded sequences"
                    ) from error
            raise
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
        self._check_outputs(outputs, batch, bands, time)
        if targets is None:
            return
        self._check_targets(outputs, targets, batch, bands, time)
        loss_mask = jax.eval_shape(
            lambda n, e: _loss_mask(self.targets_per, n, e, batch, bands, time), lengths, extras[2]
        )
        if loss_mask is not None and not _takes_mask(self.loss_fn):
            given = "ends" if self.targets_per == "sequence" else next(iter(lengths))
            raise TypeError(
                f"loss_fn: the batch has {given}, so the loss must skip the targets that do "
                "not count: expected loss_fn(outputs, targets, mask), mask "
                f"{'[batch]' if self.targets_per == 'sequence' else '[batch, bands, time]'} "
                "bools; wrap a per-element loss in banded_rnn.training.masked_mean(...)"
            )
        for name, fn in [("loss_fn", self.loss_fn), *self.metrics.items()]:
            self._check_reduction(name, fn, outputs, targets, loss_mask, scalar=fn is self.loss_fn)

    def _check_lengths(self, seq_lengths, mask, ends, batch, bands, time) -> dict:
        """The model's keyword arguments for ``seq_lengths`` or ``mask``, checked."""
        if seq_lengths is not None and mask is not None:
            raise ValueError("seq_lengths, mask: give one or the other, not both")
        if ends is not None:
            if self.targets_per != "sequence":
                raise ValueError(
                    "ends: marks the windows where a sequence's one target counts; it "
                    "needs targets_per='sequence' (this step has targets_per='step': pass "
                    "seq_lengths or mask to leave steps out)"
                )
            if _validate.shape_of(ends) != (batch,) or _validate.dtype_of(ends) != np.bool_:
                raise ValueError(
                    f"ends: expected bools [batch] = ({batch},); received "
                    f"{_validate.shape_of(ends)} {_validate.dtype_of(ends)}"
                )
        if seq_lengths is not None:
            # Shapes and dtype only: values are checked on every call (check()),
            # and a global array of several processes has none to read here.
            shape, dtype = _validate.shape_of(seq_lengths), _validate.dtype_of(seq_lengths)
            if shape not in ((batch,), (batch, bands)):
                raise ValueError(
                    f"seq_lengths: expected shape [batch] = ({batch},) or [batch, bands] = "
                    f"({batch}, {bands}); received {shape}"
                )
            if not np.issubdtype(dtype, np.integer):
                raise TypeError(f"seq_lengths: expected an integer dtype; received {dtype}")
            return {"seq_lengths": seq_lengths}
        if mask is not None:
            _validate.check_mask_shape(_validate.shape_of(mask), batch, bands, time)
            if _validate.dtype_of(mask) != np.bool_:
                raise TypeError(f"mask: expected a bool dtype; received {_validate.dtype_of(mask)}")
            return {"mask": mask}
        return {}

    def _check_outputs(self, outputs, batch, bands, time) -> None:
        shape = _validate.shape_of(outputs)
        if self.targets_per == "step" and shape[:3] != (batch, bands, time):
            raise ValueError(
                "outputs: with targets per step, expected the model's outputs "
                f"[batch, bands, time, ...] = ({batch}, {bands}, {time}, ...); received "
                f"{shape}. For one target per sequence (a classifier's logits), build the "
                "step with targets_per='sequence'"
            )
        if self.targets_per == "sequence" and shape[:1] != (batch,):
            raise ValueError(
                f"outputs: expected the model's outputs [batch, ...] = ({batch}, ...); "
                f"received {shape}"
            )

    def _check_targets(self, outputs, targets, batch, bands, time) -> None:
        out_shape, target_shape = tuple(outputs.shape), _validate.shape_of(targets)
        if self.targets_per == "sequence":
            lead, expected = (batch,), f"[batch, ...] = ({batch}, ...)"
        else:
            lead = (batch, bands, time)
            expected = f"[batch, bands, time, ...] = {lead}"
        if target_shape[: len(lead)] != lead or (
            len(target_shape) == len(out_shape) and target_shape != out_shape
        ):
            raise ValueError(
                f"targets: expected shape {expected}, the outputs' shape {out_shape} when of "
                f"their rank; received {target_shape}"
            )

    @staticmethod
    def _check_reduction(name, fn, outputs, targets, mask, *, scalar) -> None:
        """Raises unless ``fn`` (the loss, or a metric) takes these outputs and
        targets and returns a scalar (the loss) or per-target values."""
        try:
            value = jax.eval_shape(
                lambda o, t, m: _call_loss(fn, o, t, m) if scalar else fn(o, t),
                outputs, targets, mask,
            )  # fmt: skip
        except Exception as error:
            raise ValueError(
                f"{name}: failed on the model's outputs {outputs.shape} {outputs.dtype} and the "
                f"targets {_validate.shape_of(targets)} {_validate.dtype_of(targets)}: {error}"
            ) from error
        shape = getattr(value, "shape", None)
        if scalar and shape != ():
            raise ValueError(f"{name}: expected a scalar loss; received {shape or value!r}")
        lead = None if mask is None else tuple(mask.shape)
        if not scalar and (shape is None or (lead is not None and shape[: len(lead)] != lead)):
            raise ValueError(
                f"metrics[{name!r}]: expected values per target, of shape {lead or '[batch, ...]'}"
                f" or longer; received {shape}"
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

    def _prepare(self, train_state, state, inputs, targets, rng, extras, *, abstract=False):
        """Checks a call, then lays its arguments out as the jitted step takes
        them: ``(train_state, state, inputs, targets, rng)``, and the given
        ``extras`` as keywords."""
        extras = tuple(e if e is None or hasattr(e, "shape") else np.asarray(e) for e in extras)
        named = _named(extras)
        self.check(train_state, state, inputs, targets, rng, **named, abstract=abstract)
        *placed, extras = self._place(train_state, state, inputs, targets, rng, extras)
        return placed, _named(extras)

    def _place(self, train_state, state, inputs, targets, rng, extras=(None, None, None)):
        if self.mesh is None:
            return train_state, state, inputs, targets, rng, extras
        data = _mesh.data_sharding(self.mesh)
        rows = _mesh.key_sharding(self.mesh)  # [batch, ...] on "batch" alone
        per_entry = rng is not None and _per_entry(rng, _validate.shape_of(inputs)[0])
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

    Made by :func:`make_train_step`; see there. ``lower(...)`` takes the same
    arguments and returns the jitted step's ``jax.stages.Lowered`` (for
    ``.compile().memory_analysis()``); ``check(...)`` validates without running.
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
        self._jitted = _jit_keeping_chunk_order(self._update, **kwargs)

    def _update(
        self, train_state, state, inputs, targets, rng, seq_lengths=None, mask=None, ends=None
    ):
        per_entry = _per_entry(rng, inputs.shape[0])
        lengths = _lengths(seq_lengths, mask)
        loss_mask = _loss_mask(self.targets_per, lengths, ends, *inputs.shape[:3])

        def loss_of(params):
            final_state, outputs = _run_window(
                train_state.apply_fn, params, state, inputs, rng, per_entry, lengths,
                chunk_length=self.chunk_length, truncate=self.truncate,
            )  # fmt: skip
            return _call_loss(self.loss_fn, outputs, targets, loss_mask), final_state

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
        extras = (seq_lengths, mask, ends)
        placed, keywords = self._prepare(train_state, state, inputs, targets, rng, extras)
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
        extras = (seq_lengths, mask, ends)
        placed, keywords = self._prepare(
            train_state, state, inputs, targets, rng, extras, abstract=True
        )
        with self._under_mesh():
            return self._jitted.lower(*placed, **keywords, streaming=chunks_in_time_order())


def _lengths(seq_lengths: Any, mask: Any) -> dict[str, Any]:
    """The model's keyword arguments for the steps that are valid."""
    if seq_lengths is not None:
        return {"seq_lengths": seq_lengths}
    return {} if mask is None else {"mask": mask}


def _named(extras: tuple[Any, Any, Any]) -> dict[str, Any]:
    """``extras`` as the keyword arguments of those that are given (so that a
    step lowered without them is called without them)."""
    names = ("seq_lengths", "mask", "ends")
    return {name: value for name, value in zip(names, extras, strict=True) if value is not None}


def _masked_sum(values: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The sum of ``values [mask.shape..., ...]`` where ``mask`` holds, and
    how many entries of ``mask`` hold (all of its shape's, for None)."""
    if mask is None:
        return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
    weights = _broadcast_mask(mask, values)
    return jnp.sum(jnp.where(weights, values, 0)), jnp.sum(weights, dtype=jnp.float32)


def _broadcast_mask(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``mask``, a prefix of ``values``' shape, broadcast to it."""
    if tuple(values.shape[: mask.ndim]) != tuple(mask.shape):
        raise ValueError(
            f"mask: expected a prefix of the values' shape {tuple(values.shape)}; "
            f"received {tuple(mask.shape)}"
        )
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return jnp.broadcast_to(mask, values.shape)


def _jit_keeping_chunk_order(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``jax.jit(fn)`` taking a static ``streaming``: the caller's
    ``forward_chunks`` mark, restored while ``fn`` is traced. A loop that
    carries the state from window to window marks its calls, and the mark must
    reach the model's trace, and the cache key, as a model that runs
    backwards refuses it; a trace cached without the mark would not."""

    def run(*args: Any, streaming: str | None = None, **keywords: Any) -> Any:
        with forward_chunks(streaming) if streaming else contextlib.nullcontext():
            return fn(*args, **keywords)

    return jax.jit(run, static_argnames="streaming", **kwargs)


class EvalStep(_Step):
    """``(train_state, state, inputs, targets, *, seq_lengths, mask, ends) ->
    (state, metrics)``, dropout off; ``predict(train_state, state, inputs, *,
    seq_lengths, mask) -> (state, outputs)``.

    Made by :func:`make_eval_step`; nothing is donated.
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
        self._jitted = _jit_keeping_chunk_order(self._evaluate, **kwargs)
        self._predict = _jit_keeping_chunk_order(self._outputs)

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
        lengths = _lengths(seq_lengths, mask)
        apply_fn, params = train_state.apply_fn, train_state.params
        return _apply(apply_fn, params, state, inputs, None, False, True, lengths)

    def _evaluate(
        self, train_state, state, inputs, targets, seq_lengths=None, mask=None, ends=None
    ):
        final_state, outputs = self._outputs(train_state, state, inputs, seq_lengths, mask)
        lengths = _lengths(seq_lengths, mask)
        mask = _loss_mask(self.targets_per, lengths, ends, *inputs.shape[:3])
        lead = (inputs.shape[0],) if self.targets_per == "sequence" else inputs.shape[:3]
        count = jnp.sum(mask, dtype=jnp.float32) if mask is not None else float(np.prod(lead))
        metrics = {"loss": _call_loss(self.loss_fn, outputs, targets, mask), "count": count}
        for name, fn in self.metrics.items():
            total, weight = _masked_sum(fn(outputs, targets), mask)
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
