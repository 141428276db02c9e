"""Weights between ``BandedLSTM``'s Flax variables, ``keras.layers.LSTM`` and ``torch.nn.LSTM``.

All three use the gates ``i, f, g, o`` in that order. Keras stores a layer as
``kernel [features, 4 * units]``, ``recurrent_kernel [units, 4 * units]`` and
``bias [4 * units]``, exactly as ``BandedLSTM`` does; PyTorch stores the
transposes, ``weight_ih_l{k} [4 * units, features]`` and ``weight_hh_l{k}
[4 * units, units]``, and two biases that are always summed, ``bias_ih_l{k} +
bias_hh_l{k}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import keras
import numpy as np

from banded_rnn._cell import LayerWeights

_NAMES = ("kernel", "recurrent_kernel", "bias")
_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_KERAS_OPTIONS = {
    "activation": "tanh",
    "recurrent_activation": "sigmoid",
    "use_bias": True,
    "go_backwards": False,
}
"""The ``keras.layers.LSTM`` options ``BandedLSTM`` implements, with the one value it supports."""


# -- BandedLSTM variables -----------------------------------------------------------------


def layer_weights(variables: Any, name: str = "variables") -> list[LayerWeights]:
    """Checks ``{'params': {'layer_{i}': {kernel, recurrent_kernel, bias}}}`` and
    returns its ``LayerWeights``, first layer first."""
    params = _params_of(variables, name)
    stack = [_layer_entry(params, i, name) for i in range(len(params))]
    kernel_shape, recurrent_shape = np.shape(stack[0][0]), np.shape(stack[0][1])
    units = recurrent_shape[0] if len(recurrent_shape) == 2 else 0
    features = kernel_shape[0] if len(kernel_shape) == 2 else 0
    for i, weights in enumerate(stack):
        where = f"{name}['params']['layer_{i}']"
        _check_layer_weights(weights, where, features if i == 0 else units, units)
    return stack


def _params_of(variables: Any, name: str) -> Mapping[str, Any]:
    """``variables['params']``, with the keys ``layer_0 ... layer_{n - 1}``."""
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise TypeError(
            f"{name}: expected BandedLSTM variables, a mapping "
            "{'params': {'layer_0': {'kernel', 'recurrent_kernel', 'bias'}, ...}}; "
            f"received {type(variables).__name__}"
        )
    params = variables["params"]
    if not params or sorted(params) != sorted(f"layer_{i}" for i in range(len(params))):
        raise ValueError(
            f"{name}['params']: expected the keys layer_0 ... layer_{{n - 1}}; "
            f"received {sorted(params)}"
        )
    return params


def _layer_entry(params: Mapping[str, Any], i: int, name: str) -> LayerWeights:
    """The ``LayerWeights`` under ``params['layer_{i}']``, which must hold exactly their keys."""
    layer = params[f"layer_{i}"]
    if not isinstance(layer, Mapping) or sorted(layer) != sorted(_NAMES):
        received = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
        raise ValueError(
            f"{name}['params']['layer_{i}']: expected the keys {list(_NAMES)}; received {received}"
        )
    return tuple(layer[n] for n in _NAMES)


def _check_layer_weights(weights: LayerWeights, where: str, features: int, units: int) -> None:
    """Shapes ``[features, 4u]``, ``[u, 4u]``, ``[4u]`` and floating dtypes."""
    expected = ((features, 4 * units), (units, 4 * units), (4 * units,))
    for n, value, shape in zip(_NAMES, weights, expected, strict=True):
        if tuple(np.shape(value)) != shape or units < 1:
            raise ValueError(
                f"{where}['{n}']: expected shape {shape} (kernel [features, 4 * units], "
                "recurrent_kernel [units, 4 * units], bias [4 * units]); "
                f"received {tuple(np.shape(value))}"
            )
        dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}['{n}']: expected a floating dtype; received {dtype}")


def make_variables(stack: Sequence[LayerWeights]) -> dict[str, Any]:
    """``BandedLSTM`` variables from the ``LayerWeights`` of every layer, first layer first."""
    return {
        "params": {
            f"layer_{i}": {n: jnp.asarray(value) for n, value in zip(_NAMES, weights, strict=True)}
            for i, weights in enumerate(stack)
        }
    }


def _check_stack(stack: list[LayerWeights], name: str) -> list[LayerWeights]:
    """Checks that the layers share ``units`` and that each reads the last's output."""
    units = np.shape(stack[0][1])[0]
    for i, (kernel, recurrent_kernel, _) in enumerate(stack):
        if np.shape(recurrent_kernel)[0] != units:
            raise ValueError(
                f"{name}: every layer must have the same units, as BandedLSTM has one "
                f"`units`; layer 0 has {units}, layer {i} has {np.shape(recurrent_kernel)[0]}"
            )
        if i > 0 and np.shape(kernel)[0] != units:
            raise ValueError(
                f"{name}: layer {i} must read the {units} outputs of layer {i - 1}; "
                f"its kernel has {np.shape(kernel)[0]} input features"
            )
    return stack


# -- Keras ----------------------------------------------------------------------------------


def from_keras_lstm(layer_or_layers: Any) -> dict[str, Any]:
    """``BandedLSTM`` variables from one built ``keras.layers.LSTM``, or a list
    of them for a stack (first layer first).

    The result runs every band through the same maths as the Keras layer(s):
    ``BandedLSTM(units, num_layers=len(layers)).apply(variables, None, x)`` on
    ``x [batch, bands, time, features]`` equals the Keras stack on each
    ``x[:, band]``. Only the Keras defaults the core implements are accepted:
    ``activation='tanh'``, ``recurrent_activation='sigmoid'``,
    ``use_bias=True``, ``go_backwards=False``.

    Returns:
      ``{'params': {'layer_{i}': {'kernel', 'recurrent_kernel', 'bias'}}}``.

    >>> import keras, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> lstm = keras.layers.LSTM(8, return_sequences=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype("float32")
    >>> band_1 = np.asarray(lstm(x[:, 1]))             # Keras on one band [batch, time, features]
    >>> variables = from_keras_lstm(lstm)
    >>> _, y = BandedLSTM(8).apply(variables, None, x)  # every band: [batch, bands, time, units]
    >>> bool(np.allclose(y[:, 1], band_1, atol=1e-5))
    True
    """
    many = isinstance(layer_or_layers, (list, tuple))
    lstms = list(layer_or_layers) if many else [layer_or_layers]
    if not lstms:
        raise ValueError("layer_or_layers: expected at least one keras.layers.LSTM; received []")
    stack = [
        _keras_layer_weights(lstm, f"layer_or_layers[{i}]" if many else "layer_or_layers")
        for i, lstm in enumerate(lstms)
    ]
    return make_variables(_check_stack(stack, "layer_or_layers"))


def _keras_layer_weights(lstm: Any, where: str) -> LayerWeights:
    """The ``LayerWeights`` of one built ``keras.layers.LSTM`` with supported options."""
    if not isinstance(lstm, keras.layers.LSTM):
        raise TypeError(
            f"{where}: expected a keras.layers.LSTM (for a stack, a list of them); "
            f"received {type(lstm).__name__}"
        )
    if not lstm.built:
        raise ValueError(f"{where}: the LSTM is not built; call it on an input or build it")
    config = lstm.get_config()
    for option, value in _KERAS_OPTIONS.items():
        if config.get(option) != value:
            raise ValueError(
                f"{where}: expected {option}={value!r}, the only value BandedLSTM "
                f"implements; received {config.get(option)!r}"
            )
    # Not get_weights(): Keras 3.15's Variable.numpy() warns under NumPy 2.
    return tuple(keras.ops.convert_to_numpy(w.value) for w in lstm.weights)


def to_keras_lstm(variables: Any) -> list[list[np.ndarray]]:
    """The weight lists for ``keras.layers.LSTM``, one per layer of ``variables``.

    ``for lstm, weights in zip(lstms, to_keras_lstm(variables)):
    lstm.set_weights(weights)`` gives each ``keras.layers.LSTM(units)`` (built
    on the right number of features) exactly the weights of that layer. A
    one-layer model gives a list of one list.

    >>> import jax, keras, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> variables = BandedLSTM(8).init(jax.random.key(0), None, np.zeros((1, 3, 1, 4)))
    >>> lstm = keras.layers.LSTM(8)
    >>> lstm.build((None, None, 4))                    # [batch, time, features]
    >>> lstm.set_weights(to_keras_lstm(variables)[0])
    """
    return [[np.asarray(w) for w in weights] for weights in layer_weights(variables)]


# -- PyTorch --------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """A NumPy array, reading torch tensors through their own methods (torch is
    never imported here: a tensor's methods need no import)."""
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.float16", "torch.bfloat16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def from_torch_lstm(state_dict: Any) -> dict[str, Any]:
    """``BandedLSTM`` variables from a ``torch.nn.LSTM``'s ``state_dict()``.

    Args:
      state_dict: a mapping with ``weight_ih_l{k} [4 * units, features]``,
        ``weight_hh_l{k} [4 * units, units]`` and, unless the LSTM was built
        with ``bias=False``, ``bias_ih_l{k}`` and ``bias_hh_l{k}`` ``[4 *
        units]``, for ``k = 0 .. num_layers - 1``: torch tensors or NumPy
        arrays. A ``torch.nn.LSTM`` itself is accepted too. Bidirectional
        LSTMs (``*_reverse`` keys) and ``proj_size`` (``weight_hr_l{k}``) have
        no counterpart in ``BandedLSTM`` and raise a ``ValueError``.

    Returns:
      ``{'params': {'layer_{k}': {'kernel', 'recurrent_kernel', 'bias'}}}`` with
      ``kernel = weight_ih.T``, ``recurrent_kernel = weight_hh.T`` and
      ``bias = bias_ih + bias_hh``; ``batch_first`` does not matter, as
      ``BandedLSTM`` always takes ``[batch, bands, time, features]``.

    >>> import numpy as np, torch
    >>> from banded_rnn import BandedLSTM
    >>> lstm = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype("float32")
    >>> with torch.no_grad():
    ...     band_0 = lstm(torch.from_numpy(x[:, 0]))[0].numpy()  # [batch, time, units]
    >>> _, y = BandedLSTM(8, num_layers=2).apply(from_torch_lstm(lstm), None, x)
    >>> bool(np.allclose(y[:, 0], band_0, atol=1e-5))
    True
    """
    if not isinstance(state_dict, Mapping) and callable(getattr(state_dict, "state_dict", None)):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping such as torch.nn.LSTM.state_dict(); "
            f"received {type(state_dict).__name__}"
        )
    entries = _torch_layer_entries(state_dict)
    stack = [_torch_layer_weights(entry, k) for k, entry in enumerate(entries)]
    return make_variables(_check_stack(stack, "state_dict"))


def _torch_layer_entries(state_dict: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """The arrays of ``state_dict`` per layer ``k``, ``{'weight_ih': ..., ...}``,
    for layers ``0 .. n - 1``; options ``BandedLSTM`` lacks raise."""
    entries: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        kind, layer = _parse_torch_key(str(key))
        entries.setdefault(layer, {})[kind] = _to_numpy(value)
    if not entries or sorted(entries) != list(range(len(entries))):
        raise ValueError(
            f"state_dict: expected layers l0 ... l{{n - 1}}; received {sorted(entries)}"
        )
    return [entries[k] for k in range(len(entries))]


def _parse_torch_key(key: str) -> tuple[str, int]:
    """``'weight_ih_l1'`` to ``('weight_ih', 1)``."""
    match = _TORCH_KEY.match(key)
    if match is None:
        raise ValueError(
            f"state_dict: unexpected key {key!r}; expected weight_ih_l{{k}}, "
            "weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}"
        )
    kind, layer, reverse = match.groups()
    if reverse:
        raise ValueError(
            f"state_dict: key {key!r} belongs to a bidirectional torch.nn.LSTM; "
            "BandedLSTM runs forwards only (bidirectional=False)"
        )
    if kind == "weight_hr":
        raise ValueError(
            f"state_dict: key {key!r} belongs to a torch.nn.LSTM with proj_size > 0; "
            "BandedLSTM has no projection (proj_size=0)"
        )
    return kind, int(layer)


def _torch_layer_weights(entry: Mapping[str, np.ndarray], k: int) -> LayerWeights:
    """The ``LayerWeights`` of torch layer ``k``: the weights transposed, the biases summed."""
    for kind in ("weight_ih", "weight_hh"):
        if kind not in entry:
            raise ValueError(f"state_dict: missing {kind}_l{k}")
    weight_ih, weight_hh = entry["weight_ih"], entry["weight_hh"]
    if weight_hh.ndim != 2 or weight_hh.shape[0] != 4 * weight_hh.shape[1]:
        raise ValueError(
            f"state_dict['weight_hh_l{k}']: expected shape [4 * units, units]; "
            f"received {weight_hh.shape}"
        )
    units = weight_hh.shape[1]
    if weight_ih.ndim != 2 or weight_ih.shape[0] != 4 * units:
        raise ValueError(
            f"state_dict['weight_ih_l{k}']: expected shape [4 * units, features] = "
            f"({4 * units}, features); received {weight_ih.shape}"
        )
    return weight_ih.T, weight_hh.T, _torch_bias(entry, k, units, weight_hh.dtype)


def _torch_bias(entry: Mapping[str, np.ndarray], k: int, units: int, dtype: Any) -> np.ndarray:
    """``bias_ih_l{k} + bias_hh_l{k}``, or zeros for ``bias=False``."""
    biases = [entry.get(kind) for kind in ("bias_ih", "bias_hh")]
    if sum(b is None for b in biases) == 1:
        raise ValueError(f"state_dict: layer {k} has only one of bias_ih_l{k}, bias_hh_l{k}")
    for kind, b in zip(("bias_ih", "bias_hh"), biases, strict=True):
        if b is not None and b.shape != (4 * units,):
            raise ValueError(
                f"state_dict['{kind}_l{k}']: expected shape ({4 * units},); received {b.shape}"
            )
    return np.zeros(4 * units, dtype) if biases[0] is None else biases[0] + biases[1]


def to_torch_lstm(variables: Any, tensors: bool = True) -> dict[str, Any]:
    """A ``state_dict`` for ``torch.nn.LSTM(features, units, num_layers)``.

    ``torch_lstm.load_state_dict(to_torch_lstm(variables))`` gives the torch
    LSTM (``bias=True``, either ``batch_first``) the weights of every layer;
    the whole bias goes to ``bias_ih_l{k}`` and ``bias_hh_l{k}`` is zero.

    Args:
      variables: ``BandedLSTM`` variables.
      tensors: return torch tensors (imports torch); ``False`` gives NumPy arrays.

    >>> import jax, numpy as np, torch
    >>> from banded_rnn import BandedLSTM
    >>> variables = BandedLSTM(8).init(jax.random.key(0), None, np.zeros((1, 3, 1, 4)))
    >>> torch.nn.LSTM(4, 8).load_state_dict(to_torch_lstm(variables))
    <All keys matched successfully>
    """
    state_dict = {}
    for k, (kernel, recurrent_kernel, bias) in enumerate(layer_weights(variables)):
        bias = np.asarray(bias)
        state_dict[f"weight_ih_l{k}"] = np.ascontiguousarray(np.asarray(kernel).T)
        state_dict[f"weight_hh_l{k}"] = np.ascontiguousarray(np.asarray(recurrent_kernel).T)
        state_dict[f"bias_ih_l{k}"] = bias.copy()
        state_dict[f"bias_hh_l{k}"] = np.zeros_like(bias)
    if tensors:
        import torch

        state_dict = {key: torch.from_numpy(value) for key, value in state_dict.items()}
    return state_dict
