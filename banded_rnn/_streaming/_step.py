"""The pure streaming step: reset some streams, then run one chunk from the carried state.

A streamed model is any Flax module with ``BandedLSTM``'s calling convention,
``model.apply(variables, state, inputs, ...) -> (final_state, outputs)``: inputs
``[batch, bands, time, features]``, outputs ``[batch, bands, time, ...]``, a
state that is any pytree whose leaves are ``[batch, bands, ...]``, and
``state=None`` meaning the zero state (the convention ``make_train_step`` and
``fit`` rely on too).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .. import _validate
from .._backends import _packed
from .._banded import BandedLSTM
from .._state import reset_state
from .._time_order import forward_chunks

StepFn = Callable[..., tuple[Any, jax.Array]]

CONVENTION = (
    "model.apply(variables, state, inputs [batch, bands, time, features]) -> "
    "(final_state, outputs [batch, bands, time, ...])"
)


def check_model(model: Any) -> nn.Module:
    """``model`` if it is a Flax module, or ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a Flax module with BandedLSTM's calling convention, {CONVENTION}; "
            f"received {type(model).__name__}"
        )
    return model


def takes_keyword(model: nn.Module, name: str, *, by_name: bool = False) -> bool:
    """Whether ``model.__call__`` accepts the keyword argument ``name``: by its
    name, or (unless ``by_name``) through ``**kwargs``."""
    try:
        parameters = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):  # no signature to read: pass nothing extra
        return False
    return (
        name in parameters
        or not by_name
        and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    )


def stream_apply(
    model: nn.Module,
    variables: Any,
    state: Any,
    chunk: jax.Array,
    reset: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """``model.apply`` on one ``chunk [batch, bands, time >= 1, features]``,
    after zeroing the states where ``reset`` is true, with dropout off
    (``deterministic=True`` where ``model.__call__`` takes it).

    Checks run while tracing, before XLA and before any buffer is donated: here
    what only streaming asks (a non-empty chunk of the state's ``[batch,
    bands]``, state leaves that all lead with them, the reset mask); the model
    checks the rest (a ``BandedLSTM`` its state and features).
    """
    features = _validate.input_features(variables) if isinstance(model, BandedLSTM) else None
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    chunk = _validate.check_inputs(
        chunk,
        "chunk",
        features=features,
        batch_bands=_leading_batch_bands(leaves),
        nonempty=True,
    )
    batch, bands = chunk.shape[:2]
    _check_state_leaves(leaves, batch, bands)
    if reset is not None:
        _validate.check_batch_mask(reset, batch, bands)
        if state is not None:
            state = reset_state(state, reset)
    keywords = _inference_keywords(model)
    if seq_lengths is not None:
        keywords["seq_lengths"] = seq_lengths
    with forward_chunks("a Stream"):
        return model.apply(variables, state, chunk, **keywords)


def _inference_keywords(model: nn.Module) -> dict[str, Any]:
    """``deterministic=True`` where ``model.__call__`` takes it: dropout off."""
    return {"deterministic": True} if takes_keyword(model, "deterministic") else {}


def without_packed_weights(variables: Any) -> Any:
    """``variables`` without the packed-weights collection (a copy made from
    other parameters must never be read)."""
    if isinstance(variables, Mapping) and _packed.PACKED_COLLECTION in variables:
        return {k: v for k, v in variables.items() if k != _packed.PACKED_COLLECTION}
    return variables


def with_packed_weights(model: nn.Module, variables: Any, chunk: np.ndarray) -> Any:
    """``variables`` plus the forward weights of every ``BandedLSTM`` in
    ``model`` that runs the native kernel, packed once (one compilation) in the
    collection the kernel reads them from, so that the calls of a stream skip
    packing them (0.9 ms of a 3.8 ms frame for two layers of 384 units).
    ``variables`` unchanged where no layer runs the kernel."""
    variables = without_packed_weights(variables)
    keywords = _inference_keywords(model)

    def prepare(variables, chunk):
        with _packed.packing():
            _, packed = model.apply(
                variables, None, chunk, mutable=[_packed.PACKED_COLLECTION], **keywords
            )
        return packed

    if not jax.eval_shape(prepare, variables, chunk):
        return variables
    return {**variables, **jax.jit(prepare)(variables, chunk)}


def _leading_batch_bands(leaves: list[tuple[Any, Any]]) -> tuple[int, int] | None:
    """The ``[batch, bands]`` the state's first leaf leads with, which the chunk
    must match (so that a chunk of the wrong size is named, not the state)."""
    if not leaves:
        return None
    shape = _validate.shape_of(leaves[0][1])
    return shape[:2] if len(shape) >= 2 else None


def _check_state_leaves(leaves: list[tuple[Any, Any]], batch: int, bands: int) -> None:
    """Every leaf of the state leads with ``[batch, bands]``: resets and saved
    files address the state per (sequence, band)."""
    for path, leaf in leaves:
        shape = _validate.shape_of(leaf)
        if shape[:2] != (batch, bands):
            raise ValueError(
                f"state{jax.tree_util.keystr(path)}: expected shape [batch, bands, ...] = "
                f"({batch}, {bands}, ...) (every leaf of a streamed state leads with the "
                f"chunk's [batch, bands]); received {shape}"
            )


def stream_step(model: nn.Module) -> StepFn:
    """A jit-compiled streaming step of ``model`` with the state donated.

    ``model`` is a ``BandedLSTM`` or any Flax module with its calling
    convention, ``model.apply(variables, state, inputs, ...) -> (final_state,
    outputs)``: e.g. per-band layers before and after one or more
    ``BandedLSTM``, with a state that is any pytree whose leaves are ``[batch,
    bands, ...]``. The returned function is pure::

        step(variables, state, chunk, reset=None, seq_lengths=None) -> (state, outputs)

    with ``chunk [batch, bands, time, features]`` (``time >= 1``) and
    ``outputs [batch, bands, time, ...]``. ``reset``, a bool mask ``[batch]``
    or ``[batch, bands]``, zeroes those states before the chunk is processed,
    inside the compiled function: changing which streams are reset never
    recompiles. ``seq_lengths`` is passed on to the model (pad a chunk to a
    fixed length and mask the padding, as :class:`Stream` does); ``deterministic=True``
    is passed where ``model.__call__`` takes it, so dropout is off.

    The state's buffers are donated: XLA updates them in place, and the arrays
    passed as ``state`` are deleted by the call. Keep only the returned state,
    and give every leaf its own buffer, as ``BandedLSTM.initial_state`` does
    (``None`` starts from the model's zero state, as one more compilation). Shapes
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
    jitted = jitted_step(model)
    seen: list[Any] = [None, None]  # the last variables given, and one of their leaves

    @functools.wraps(jitted)
    def step(variables, state, chunk, reset=None, seq_lengths=None):
        # A jitted call traces before it sees a device, then refuses committed
        # arrays on different devices naming its own arguments: a chunk on the
        # device is named here (a NumPy chunk goes where the variables are). The
        # variables are flattened once while the same object comes back.
        if isinstance(chunk, jax.Array):
            if seen[0] is not variables:
                seen[:] = variables, jax.tree.leaves(variables)[:1]
            _validate.check_devices(
                variables=seen[1], state=state, chunk=chunk, reset=reset, seq_lengths=seq_lengths
            )
        return jitted(variables, state, chunk, reset, seq_lengths)

    step.lower = jitted.lower
    return step


def jitted_step(model: nn.Module) -> StepFn:
    """:func:`stream_step` without its device check (``Stream`` moves every
    array to one device itself): the jitted function alone."""
    return jax.jit(partial(stream_apply, check_model(model)), donate_argnums=1)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a stream of a model is, checked once: ``[batch, bands]``, the
    chunks' features and dtype, the state (a pytree of ``ShapeDtypeStruct``,
    as the model returns it), and whether the model takes ``seq_lengths``."""

    batch_size: int
    num_bands: int
    features: int
    dtype: np.dtype
    state: Any
    takes_seq_lengths: bool

    def zeros(self, make: Callable[[tuple[int, ...], Any], Any] = np.zeros) -> Any:
        """The zero state, every leaf its own ``make(shape, dtype)``."""
        return jax.tree.map(lambda leaf: make(leaf.shape, leaf.dtype), self.state)

    def state_layout(self) -> list[list[Any]]:
        """``[path, shape, dtype]`` of every state leaf, in ``jax.tree`` order."""
        return [
            [jax.tree_util.keystr(path), list(leaf.shape), np.dtype(leaf.dtype).name]
            for path, leaf in jax.tree_util.tree_flatten_with_path(self.state)[0]
        ]


def stream_spec(
    model: Any,
    variables: Any,
    batch_size: Any,
    num_bands: Any,
    dtype: Any,
    features: Any = None,
) -> StreamSpec:
    """Checks the arguments every stream of ``model`` takes, or raises.

    The state's structure comes from the model itself: ``model.apply(variables,
    None, chunk)`` (the zero state, as ``fit`` builds it too), then once more
    from that state, which must come back with the same structure and shapes.
    Both are traced with ``jax.eval_shape``: nothing compiles.
    """
    check_model(model)
    batch_size = _validate.positive_int(batch_size, "batch_size")
    num_bands = _validate.positive_int(num_bands, "num_bands")
    dtype = _validate.floating_dtype(dtype)
    features = _stream_features(model, variables, features)
    chunk = jax.ShapeDtypeStruct((batch_size, num_bands, 1, features), dtype)
    apply = partial(stream_apply, model)
    try:
        state, _ = jax.eval_shape(apply, variables, None, chunk)
    except (TypeError, AttributeError, KeyError, IndexError) as error:
        raise TypeError(
            f"model: {type(model).__name__}.apply(variables, None, chunk) raised "
            f"{type(error).__name__}: {error}. A streamed model starts from its zero state "
            f"when given state=None, as BandedLSTM does, and takes chunks [batch, bands, "
            f"time, features] = ({batch_size}, {num_bands}, time, {features}) (features="
            f"{features})"
        ) from error
    _check_zero_state(model, state, batch_size, num_bands)
    returned, outputs = jax.eval_shape(apply, variables, state, chunk)
    _check_returned_state(model, state, returned)
    if not isinstance(outputs, jax.ShapeDtypeStruct) or outputs.shape[:3] != chunk.shape[:3]:
        received = getattr(outputs, "shape", type(outputs).__name__)
        raise ValueError(
            f"model: expected outputs [batch, bands, time, ...] = ({batch_size}, {num_bands}, "
            f"1, ...) for a chunk of one step, as {CONVENTION}; received {received}"
        )
    return StreamSpec(
        batch_size,
        num_bands,
        features,
        dtype,
        state,
        # By name: a **kwargs that dropped it would let padded steps run.
        takes_keyword(model, "seq_lengths", by_name=True),
    )


def _stream_features(model: nn.Module, variables: Any, features: Any) -> int:
    """The chunks' features: read from a ``BandedLSTM``'s variables, given for other models."""
    if isinstance(model, BandedLSTM):
        found = _validate.check_variables(model, variables)
        if features is not None and features != found:
            raise ValueError(
                f"features: the variables' kernel is [{found}, 4 * units], so each chunk "
                f"has {found} features; received features={features!r}"
            )
        return found
    if features is None:
        raise ValueError(
            f"features: expected the chunks' feature count (inputs [batch, bands, time, "
            f"features]); it is read from the variables of a BandedLSTM only, and model is "
            f"a {type(model).__name__}"
        )
    return _validate.positive_int(features, "features")


def _check_zero_state(model: nn.Module, state: Any, batch_size: int, num_bands: int) -> None:
    """The state a chunk leaves: floating arrays, each ``[batch, bands, ...]``."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    name = type(model).__name__
    if not leaves:
        raise ValueError(f"model: {name} returns a state with no arrays ({state!r})")
    for path, leaf in leaves:
        if not np.issubdtype(leaf.dtype, np.floating):
            raise TypeError(
                f"model: the state {name} returns, at {jax.tree_util.keystr(path) or 'its root'}"
                f": expected a floating dtype; received {leaf.dtype}"
            )
    try:
        _check_state_leaves(leaves, batch_size, num_bands)
    except ValueError as error:
        raise ValueError(f"model: the state {name} returns: {error}") from None


def _check_returned_state(model: nn.Module, state: Any, returned: Any) -> None:
    """Fed its own state back, the model returns one of the same structure and
    shapes: the state a stream carries never changes its type."""
    name = type(model).__name__
    if jax.tree.structure(state) != jax.tree.structure(returned):
        raise ValueError(
            f"model: fed the state it returned, {jax.tree.structure(state)}, {name} returns "
            f"another structure, {jax.tree.structure(returned)}"
        )
    paths = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, before), after in zip(paths, jax.tree.leaves(returned), strict=True):
        if (before.shape, before.dtype) != (after.shape, after.dtype):
            raise ValueError(
                f"model: state{jax.tree_util.keystr(path)} is {before.dtype}{list(before.shape)}"
                f" after a chunk from state=None, but {after.dtype}{list(after.shape)} after a "
                f"chunk from that state"
            )
