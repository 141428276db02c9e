"""Every check on user input, written once for the Flax module, streaming,
training and the Keras layer.

Checks run on static shapes before anything reaches XLA and raise
``ValueError`` (wrong value or shape) or ``TypeError`` (wrong kind or dtype)
with a message that names the argument, what was expected and what was
received. Shapes may hold ``None`` for axes not known yet (Keras's symbolic
tensors): ``None`` matches any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._state import LSTMState, State

Shape = tuple[int | None, ...]

_STATE_ORDER_HINT = (
    "Name the pair: LSTMState(hidden=h, cell=c) (Keras orders it [h, c], PyTorch (h, c), "
    "Flax (c, h))"
)


def shape_of(x: Any) -> Shape:
    """The shape of an array, a tracer, a ``ShapeDtypeStruct`` or a Keras tensor."""
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def dtype_of(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dtype is None else dtype


def _matches(received: Shape, expected: Shape) -> bool:
    return len(received) == len(expected) and all(
        r is None or e is None or r == e for r, e in zip(received, expected, strict=True)
    )


# -- scalars --------------------------------------------------------------------------


def positive_int(value: Any, name: str, *, minimum: int = 1, optional: bool = False) -> Any:
    """``value`` as an ``int >= minimum`` (``None`` too when ``optional``), or
    ``ValueError``. Booleans are refused: ``True`` is no count."""
    if optional and value is None:
        return None
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        expected = f"{'None or ' if optional else ''}an integer >= {minimum}"
        raise ValueError(f"{name}: expected {expected}; received {value!r}")
    return int(value)


def rate(value: Any, name: str) -> float:
    """``value`` as a dropout rate in ``[0, 1)``, or ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name}: expected a rate in [0, 1); received {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1); received {value!r}")
    return float(value)


def floating_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy floating dtype, or ``TypeError``."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{name}: expected a floating dtype; received {dtype}")
    return dtype


# -- inputs ---------------------------------------------------------------------------


def check_input_shape(
    shape: Shape,
    name: str = "inputs",
    *,
    features: int | None = None,
    batch_bands: tuple[int | None, int | None] | None = None,
) -> None:
    """Rank 4, ``[batch, bands, time, features]``, with ``features`` and
    ``batch_bands`` when given.

    Batch, bands and time may be ``None`` (symbolic); the features may not. A
    rank-3 shape gets a hint naming the axis that is missing.
    """
    shape = tuple(shape)
    batch, bands = (None, None) if batch_bands is None else batch_bands
    expected = (batch, bands, None, features)
    if len(shape) != 4:
        raise ValueError(
            f"{name}: expected rank 4, [batch, bands, time, features]; received shape "
            f"{shape}{_missing_axis_hint(shape, expected)}"
        )
    if shape[3] is None:
        raise ValueError(f"{name}: the features axis must be static; received shape {shape}")
    if shape[3] == 0:
        raise ValueError(
            f"{name}: expected at least one feature, [batch, bands, time, features >= 1]; "
            f"received shape {shape}"
        )
    if not _matches(shape[:2], (batch, bands)):
        raise ValueError(
            f"{name}: expected shape [batch, bands, time, features] = ({batch}, {bands}, time, "
            f"{'features' if features is None else features}); received shape {shape}"
        )
    if features is not None and shape[3] != features:
        raise ValueError(
            f"{name}: expected {features} features, [batch, bands, time, {features}] (the "
            f"kernel is [{features}, 4 * units]); received shape {shape}"
        )


def _missing_axis_hint(shape: Shape, expected: Shape) -> str:
    if len(shape) != 3:
        return ""
    for axis, what, fix in ((1, "bands", "x[:, None]"), (2, "time", "x[:, :, None]")):
        if _matches((*shape[:axis], 1, *shape[axis:]), expected):
            one = "band" if what == "bands" else "time step"
            return f"; for one {one}, add the {what} axis: {fix}"
    return ""


def as_array(value: Any, name: str, *, abstract: bool = False) -> Any:
    """``value`` as an array: a NumPy or JAX array, a tracer or a Keras tensor
    as it is; nested lists converted. Refuses what would lose information or
    has no values (a masked array, a ``ShapeDtypeStruct`` unless
    ``abstract``), ``None``, strings, ragged lists and objects, naming
    ``name``."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: expected an array; received a NumPy masked array, whose mask would be "
            "dropped. Pass its data (np.ma.getdata(x) or x.filled(0)) and give the mask "
            "where the call takes one (mask= or seq_lengths=)"
        )
    if isinstance(value, jax.ShapeDtypeStruct) and not abstract:
        raise TypeError(
            f"{name}: expected an array with values; received a jax.ShapeDtypeStruct of shape "
            f"{value.shape} (shapes alone: call through jax.eval_shape)"
        )
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{name}: expected an array; received {type(value).__name__}")
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(
            f"{name}: expected a rectangular array; received nested sequences of unequal "
            "lengths (ragged)"
        ) from None
    if array.dtype == object:
        raise TypeError(f"{name}: expected an array of numbers; received {type(value).__name__}")
    return array


def check_time_major_inputs(inputs: Any, features: int | None) -> Any:
    """``inputs [time, batch, bands, features]`` (``time_major=True``) as an
    array ``[batch, bands, time, features]``, or ``ValueError`` naming the
    time-major shape."""
    inputs = as_array(inputs, "inputs")
    if inputs.ndim != 4:
        raise ValueError(
            "inputs: with time_major=True, expected rank 4, [time, batch, bands, "
            f"features]; received shape {tuple(inputs.shape)}"
        )
    if features is not None and inputs.shape[-1] != features:
        raise ValueError(
            f"inputs: with time_major=True, expected [time, batch, bands, {features}] "
            "(the features the parameters were built for); "
            f"received shape {tuple(inputs.shape)}"
        )
    return jnp.moveaxis(inputs, 0, 2)


def check_inputs(
    inputs: Any,
    name: str = "inputs",
    *,
    features: int | None = None,
    batch_bands: tuple[int, int] | None = None,
    nonempty: bool = False,
    abstract: bool = False,
) -> jax.Array:
    """``inputs`` as an array ``[batch, bands, time, features]`` of a floating
    dtype (with ``nonempty``, at least one sequence, band and time step), or
    raises."""
    inputs = as_array(inputs, name, abstract=abstract)
    check_input_shape(inputs.shape, name, features=features, batch_bands=batch_bands)
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype; received {inputs.dtype}")
    if nonempty and 0 in tuple(inputs.shape)[:3]:
        raise ValueError(
            f"{name}: expected at least one sequence, band and time step, [batch >= 1, "
            f"bands >= 1, time >= 1, features]; received shape {tuple(inputs.shape)}"
        )
    return inputs


def refuse_nonfinite(array: Any, name: str, axes: str) -> None:
    """``ValueError`` naming ``name`` and the first index of ``array`` (its
    leading axes, ``axes`` as ``"[band, step, feature]"``) that holds a NaN or
    an infinity (checked on the host); nothing was run."""
    finite = np.isfinite(np.asarray(array))
    if not finite.all():
        where = [int(i) for i in np.argwhere(~finite)[0][: axes.count(",") + 1]]
        raise ValueError(
            f"{name}: expected finite values (check_finite=True); received NaN or infinity, "
            f"first at {axes} = {where}; nothing was run"
        )


def plain_dicts(tree: Any) -> Any:
    """Nested mappings (Flax's ``FrozenDict`` included) as plain dicts."""
    if hasattr(tree, "items"):
        return {key: plain_dicts(value) for key, value in tree.items()}
    return tree


def check_devices(**arrays: Any) -> None:
    """Raises ``ValueError`` when the concrete, committed ``jax.Array`` s among
    the named pytrees ``arrays`` live on different devices (a jitted call would
    refuse them, naming its internals). Tracers and uncommitted arrays go
    anywhere."""
    seen: tuple[str, Any] | None = None
    for name, tree in arrays.items():
        for leaf in jax.tree.leaves(tree):
            if (
                not isinstance(leaf, jax.Array)
                or isinstance(leaf, jax.core.Tracer)
                or not leaf.committed
            ):
                continue
            devices = leaf.sharding.device_set
            if seen is None:
                seen = (name, devices)
            elif devices != seen[1]:
                ids = sorted(d.id for d in seen[1]), sorted(d.id for d in devices)
                raise ValueError(
                    f"{name}: on device(s) {ids[1]}, but {seen[0]} on {ids[0]}; put them on "
                    f"the same devices (jax.device_put({name}, ...))"
                )
            break  # one leaf per argument: a pytree on several device sets is XLA's to refuse


# -- state ----------------------------------------------------------------------------


def check_state(
    state: Any, num_layers: int, shape: Shape, name: str = "state", directions: int = 1
) -> State:
    """``state`` as a tuple of ``num_layers * directions`` ``LSTMState``, each
    field of ``shape [batch, bands, units]`` and a floating dtype, or raises."""
    count = num_layers * directions
    per = "one per layer" if directions == 1 else "one per layer and direction"
    if isinstance(state, LSTMState) or not isinstance(state, Sequence):
        raise TypeError(
            f"{name}: expected a tuple of {count} LSTMState ({per}, as "
            f"model.initial_state returns); received {type(state).__name__}"
        )
    if len(state) != count:
        hint = ""
        if not any(isinstance(s, LSTMState) for s in state) and all(
            hasattr(s, "shape") for s in state
        ):
            hint = f"; it holds {len(state)} arrays, not layer states. {_STATE_ORDER_HINT}"
        layout = f"num_layers={num_layers}"
        if directions == 2:
            layout = (
                f"2 * num_layers, num_layers={num_layers}, in torch's h_n order: layer 0 "
                "forward, layer 0 backward, layer 1 forward, ..."
            )
        raise ValueError(
            f"{name}: expected a tuple of {count} LSTMState ({layout}); "
            f"received {len(state)} items{hint}"
        )
    for layer, layer_state in enumerate(state):
        if not isinstance(layer_state, LSTMState):
            raise TypeError(
                f"{name}[{layer}]: expected an LSTMState(hidden, cell); received "
                f"{type(layer_state).__name__}. {_STATE_ORDER_HINT}"
            )
        for field, value in zip(LSTMState._fields, layer_state, strict=True):
            if not _matches(shape_of(value), tuple(shape)):
                raise ValueError(
                    f"{name}[{layer}].{field}: expected shape [batch, bands, units] = "
                    f"{tuple(shape)}; received {shape_of(value)}"
                )
            if not jnp.issubdtype(dtype_of(value), jnp.floating):
                raise TypeError(
                    f"{name}[{layer}].{field}: expected a floating dtype; received "
                    f"{dtype_of(value)}"
                )
    return tuple(state)


def check_batch_mask(mask: Any, batch: int, bands: int, name: str = "reset") -> None:
    """A bool mask ``[batch]`` (whole sequences) or ``[batch, bands]``."""
    shape = shape_of(mask)
    if shape not in ((batch,), (batch, bands)):
        raise ValueError(
            f"{name}: expected a bool mask of shape [batch] = ({batch},) or [batch, bands] = "
            f"({batch}, {bands}); received shape {shape}"
        )
    if dtype_of(mask) != np.bool_:
        raise TypeError(f"{name}: expected a bool mask; received dtype {dtype_of(mask)}")


def check_batch_indices(indices: Any, batch_size: int, name: str = "batch") -> list[int]:
    """Sequence indices (an int, or a list or 1-d array of ints) in ``[0,
    batch_size)``: ``TypeError`` for non-integers, ``ValueError`` out of range."""
    if isinstance(indices, int | np.integer) or (
        isinstance(indices, np.ndarray) and indices.ndim == 0
    ):
        indices = [indices]
    if not isinstance(indices, Sequence | np.ndarray) or np.ndim(indices) != 1:
        raise TypeError(
            f"{name}: expected a list of integer sequence indices; received {indices!r}"
        )
    for index in indices:
        if not isinstance(index, int | np.integer) or isinstance(index, bool | np.bool_):
            raise TypeError(
                f"{name}: expected integer indices; received {type(index).__name__} {index!r}"
            )
    if not all(0 <= index < batch_size for index in indices):
        raise ValueError(f"{name}: expected indices in [0, {batch_size}); received {list(indices)}")
    return [int(index) for index in indices]


# -- per-step validity ----------------------------------------------------------------


def check_seq_lengths(
    seq_lengths: Any, batch: int, bands: int, time: int, name: str = "seq_lengths"
) -> jax.Array:
    """``seq_lengths`` as ``int32 [batch, bands]``, lengths beyond ``time``
    clipped to it (they mean every step is valid) before the cast, so that no
    length wraps around; or raises."""
    seq_lengths = as_array(seq_lengths, name)
    shape = shape_of(seq_lengths)
    if shape not in ((batch,), (batch, bands)):
        raise ValueError(
            f"{name}: expected shape [batch] = ({batch},) or [batch, bands] = "
            f"({batch}, {bands}); received {shape}"
        )
    if not jnp.issubdtype(dtype_of(seq_lengths), jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype; received {dtype_of(seq_lengths)}")
    dtype = np.dtype(dtype_of(seq_lengths))
    if isinstance(seq_lengths, jax.core.Tracer):
        if np.iinfo(dtype).max > np.iinfo(np.int32).max:  # clipped in its own dtype
            seq_lengths = jnp.minimum(seq_lengths, jnp.asarray(time, dtype))
    else:
        seq_lengths = np.asarray(seq_lengths)
        if np.any(seq_lengths < 0):
            raise ValueError(f"{name}: expected lengths >= 0; received {seq_lengths}")
        wide = np.uint64 if dtype == np.uint64 else np.int64
        seq_lengths = np.minimum(seq_lengths.astype(wide), time)
    seq_lengths = jnp.asarray(seq_lengths).astype(jnp.int32)
    if seq_lengths.ndim == 1:
        seq_lengths = seq_lengths[:, None]
    return jnp.broadcast_to(seq_lengths, (batch, bands))


def check_mask_shape(shape: Shape, batch: Any, bands: Any, time: Any, name: str = "mask") -> None:
    """``[batch, time]`` or ``[batch, bands, time]``; ``None`` matches any size."""
    shape = tuple(shape)
    if not (_matches(shape, (batch, time)) or _matches(shape, (batch, bands, time))):
        raise ValueError(
            f"{name}: expected shape [batch, time] = ({batch}, {time}) or "
            f"[batch, bands, time] = ({batch}, {bands}, {time}); received {shape}"
        )


def check_mask(mask: Any, batch: int, bands: int, time: int, name: str = "mask") -> jax.Array:
    """``mask`` (bools) broadcast to ``[batch, bands, time]``, or raises."""
    check_mask_shape(shape_of(mask), batch, bands, time, name)
    if dtype_of(mask) != np.bool_:
        raise TypeError(f"{name}: expected a bool dtype; received {dtype_of(mask)}")
    mask = jnp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[:, None, :]
    return jnp.broadcast_to(mask, (batch, bands, time))


# -- variables and keys ---------------------------------------------------------------


def input_features(variables: Any) -> int | None:
    """The features the first layer's ``kernel [features, 4 * units]`` reads, or
    None when ``variables`` hold no such kernel (yet)."""
    try:
        return int(variables["params"]["layer_0"]["kernel"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        return None


def check_variables(model: Any, variables: Any) -> int:
    """Checks that ``variables`` have the paths and shapes ``model`` makes, and
    returns the number of input features they were made for."""
    features = input_features(variables)
    if features is None:
        raise ValueError(
            f"variables: expected BandedLSTM variables, {{'params': {{'layer_0': {{'kernel': "
            f"[features, 4 * units], ...}}, ...}}}} for {model.num_layers} layer(s); received "
            f"{jax.tree.map(np.shape, variables)}"
        )
    inputs = jax.ShapeDtypeStruct((1, 1, 1, features), np.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), None, x), inputs)
    expected, received = _layout(expected), _layout(variables)
    if expected != received:
        raise ValueError(
            f"variables: expected those of {type(model).__name__}(units={model.units}, "
            f"num_layers={model.num_layers}) for {features} features, {expected}; "
            f"received {received}"
        )
    return features


def _layout(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def is_typed_key(rng: Any) -> bool:
    """Whether ``rng`` is a typed key (``jax.random.key``), not raw ``uint32`` key data."""
    return jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key)


def check_rng(rng: Any, batch: int) -> bool:
    """Validates a dropout ``rng``; returns True for one key per batch entry,
    False for one key for the batch."""
    shape = shape_of(rng)
    if is_typed_key(rng):
        if shape in ((), (batch,)):
            return shape == (batch,)
        raise ValueError(
            f"rng: expected one key (shape ()) or one per batch entry (shape ({batch},)); "
            f"received keys of shape {shape}"
        )
    dtype = getattr(rng, "dtype", None)
    if dtype != np.uint32:
        raise TypeError(
            f"rng: expected a key from jax.random.key (or uint32 key data); "
            f"received {type(rng).__name__} of dtype {dtype}"
        )
    if len(shape) == 1 or (len(shape) == 2 and shape[0] == batch):
        return len(shape) == 2
    raise ValueError(
        f"rng: expected uint32 key data [key] or one per batch entry [batch, key] "
        f"= ({batch}, key); received shape {shape}"
    )
