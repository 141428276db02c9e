"""Weights between ``BandedLSTM``'s Flax variables, ``keras.layers.LSTM`` and ``torch.nn.LSTM``.

All three use the gates ``i, f, g, o`` in that order. Keras stores a layer as
``kernel [features, 4 * units]``, ``recurrent_kernel [units, 4 * units]`` and
``bias [4 * units]``, exactly as ``BandedLSTM`` does; PyTorch stores the
transposes, ``weight_ih_l{k} [4 * units, features]`` and ``weight_hh_l{k}
[4 * units, units]``, and two biases that are always summed, ``bias_ih_l{k} +
bias_hh_l{k}``. A backward direction is ``params/layer_{i}_reverse`` here, the
``backward_layer`` of a Keras ``Bidirectional``, and the ``_reverse`` keys in
PyTorch. A stack without biases has no ``bias`` here (``BandedLSTM(use_bias=
False)``, Keras's ``use_bias=False``) and no ``bias_*`` keys in PyTorch
(``bias=False``).

The weights say how many layers and directions a stack has and whether it has
biases, but not how it computes: ``keras_lstm_options`` and
``torch_lstm_options`` give the ``BandedLSTM`` arguments that run the
converted weights as the peer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import keras
import numpy as np

from banded_rnn._internal import ACTIVATIONS

_NAMES = ("kernel", "recurrent_kernel", "bias")
_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_SUFFIXES = ("", "_reverse")
"""Each direction's key suffix, here as in PyTorch: forward, then backward."""

Weights = tuple[Any, ...]
"""One direction of one layer: ``(kernel, recurrent_kernel, bias)``, or
``(kernel, recurrent_kernel)`` without a bias."""

Stack = list[tuple[Weights, ...]]
"""Every layer, first layer first: its forward direction's weights and, in a
bidirectional stack, its backward direction's."""


# -- BandedLSTM variables -----------------------------------------------------------------


def stack_weights(variables: Any, name: str = "variables") -> Stack:
    """Checks ``BandedLSTM`` variables and returns their weights per layer and
    direction: ``{'params': {'layer_{i}': {'kernel', 'recurrent_kernel'[,
    'bias']}[, 'layer_{i}_reverse': {...}]}}``."""
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise TypeError(
            f"{name}: expected BandedLSTM variables, a mapping "
            "{'params': {'layer_0': {'kernel', 'recurrent_kernel', 'bias'}, ...}}; "
            f"received {type(variables).__name__}"
        )
    params = variables["params"]
    suffixes = _SUFFIXES if "layer_0_reverse" in params else _SUFFIXES[:1]
    num_layers = len(params) // len(suffixes)
    keys = [[f"layer_{i}{suffix}" for suffix in suffixes] for i in range(num_layers)]
    if not params or sorted(params) != sorted(key for layer in keys for key in layer):
        raise ValueError(
            f"{name}['params']: expected the keys layer_0 ... layer_{{n - 1}}, and "
            f"layer_{{i}}_reverse for every layer of a bidirectional stack; "
            f"received {sorted(params)}"
        )
    names = (
        _NAMES
        if isinstance(params["layer_0"], Mapping) and "bias" in params["layer_0"]
        else _NAMES[:2]
    )
    stack = [
        tuple(_entry(params[key], names, f"{name}['params']['{key}']") for key in layer)
        for layer in keys
    ]

    def where(i: int, direction: int, weight: str) -> str:
        return f"{name}['params']['{keys[i][direction]}']['{weight}']"

    return check_stack(stack, name, where)


def _entry(layer: Any, names: Sequence[str], where: str) -> Weights:
    """The weights under one ``params`` key, which must hold exactly ``names``
    (those of ``layer_0``: every layer has a bias, or none has)."""
    if not isinstance(layer, Mapping) or sorted(layer) != sorted(names):
        received = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
        raise ValueError(
            f"{where}: expected the keys {list(names)}, as layer_0 has (every layer has a "
            f"bias or none has); received {received}"
        )
    return tuple(layer[n] for n in names)


def check_stack(stack: Stack, name: str, where: Callable[[int, int, str], str]) -> Stack:
    """Checks what ``BandedLSTM`` needs of a stack's weights: one ``units`` and
    one number of directions for every layer, a bias in every direction or in
    none, floating dtypes, and each layer reading its predecessor's output
    (``units`` wide; for a bidirectional stack also ``2 * units``, the
    directions concatenated). ``where(layer, direction, weight)`` names a
    weight in the errors."""
    units = np.shape(stack[0][0][1])[0] if np.ndim(stack[0][0][1]) == 2 else 0
    features = np.shape(stack[0][0][0])[0] if np.ndim(stack[0][0][0]) == 2 else 0
    directions, has_bias = len(stack[0]), len(stack[0][0]) == 3
    widths = (units, 2 * units) if directions == 2 else (units,)
    for i, layer in enumerate(stack):
        if len(layer) != directions:
            raise ValueError(
                f"{name}: every layer must have the same directions, as BandedLSTM has one "
                f"`bidirectional`; layer 0 has {directions}, layer {i} has {len(layer)}"
            )
        for d, weights in enumerate(layer):
            if len(weights) != len(stack[0][0]):
                raise ValueError(
                    f"{name}: every layer must have a bias or none must, as BandedLSTM has "
                    f"one `use_bias`; layer 0 has {'one' if has_bias else 'none'}, "
                    f"layer {i} {'has none' if has_bias else 'has one'}"
                )
            recurrent = np.shape(weights[1])
            if units < 1 or recurrent != (units, 4 * units):
                raise ValueError(
                    f"{name}: every layer must have the same units, as BandedLSTM has one "
                    f"`units`; {where(0, 0, 'recurrent_kernel')} has shape "
                    f"{np.shape(stack[0][0][1])}, {where(i, d, 'recurrent_kernel')} has "
                    f"{recurrent} (expected [units, 4 * units])"
                )
            kernel = np.shape(weights[0])
            inputs = features if i == 0 else np.shape(stack[1][0][0])[0]
            if i > 0 and inputs not in widths:
                raise ValueError(
                    f"{where(i, d, 'kernel')}: layer {i} reads the outputs of layer "
                    f"{i - 1}, so expected {' or '.join(str(w) for w in widths)} input "
                    f"features; received shape {kernel}"
                )
            if kernel != (inputs, 4 * units):
                raise ValueError(
                    f"{where(i, d, 'kernel')}: expected shape {(inputs, 4 * units)} (kernel "
                    f"[features, 4 * units], the features of "
                    f"{'layer 0' if i == 0 else 'every layer after the first'}); "
                    f"received {kernel}"
                )
            if has_bias and np.shape(weights[2]) != (4 * units,):
                raise ValueError(
                    f"{where(i, d, 'bias')}: expected shape {(4 * units,)}; "
                    f"received {np.shape(weights[2])}"
                )
            for weight, value in zip(_NAMES, weights, strict=False):
                dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
                if not jnp.issubdtype(dtype, jnp.floating):
                    raise TypeError(
                        f"{where(i, d, weight)}: expected a floating dtype; received {dtype}"
                    )
    return stack


def make_variables(stack: Stack) -> dict[str, Any]:
    """``BandedLSTM`` variables from a stack's weights."""
    return {
        "params": {
            f"layer_{i}{suffix}": {
                n: jnp.asarray(value) for n, value in zip(_NAMES, weights, strict=False)
            }
            for i, layer in enumerate(stack)
            for suffix, weights in zip(_SUFFIXES, layer, strict=False)
        }
    }


# -- Keras ----------------------------------------------------------------------------------


def _keras_directions(layer: Any) -> tuple[Any, ...]:
    """The ``keras.layers.LSTM`` of each direction of a checked layer."""
    if isinstance(layer, keras.layers.Bidirectional):
        return layer.forward_layer, layer.backward_layer
    return (layer,)


def _keras_entries(layer_or_layers: Any) -> tuple[list[Any], list[str], bool]:
    """The Keras layers of a stack, their names for errors, and whether they are
    ``Bidirectional``; every one built, all ``LSTM`` or all ``Bidirectional(LSTM)``."""
    many = isinstance(layer_or_layers, (list, tuple))
    layers = list(layer_or_layers) if many else [layer_or_layers]
    if not layers:
        raise ValueError(
            "layer_or_layers: expected at least one keras.layers.LSTM or "
            "keras.layers.Bidirectional(LSTM); received []"
        )
    names = [f"layer_or_layers[{i}]" if many else "layer_or_layers" for i in range(len(layers))]
    kinds = []
    for layer, where in zip(layers, names, strict=True):
        bidirectional = isinstance(layer, keras.layers.Bidirectional)
        lstms = _keras_directions(layer)
        if not all(isinstance(lstm, keras.layers.LSTM) for lstm in lstms):
            received = type(layer).__name__
            if bidirectional:
                received += f"({type(layer.forward_layer).__name__})"
            raise TypeError(
                f"{where}: expected a keras.layers.LSTM or a keras.layers.Bidirectional "
                f"wrapping one (for a stack, a list of them); received {received}"
            )
        if not layer.built:
            raise ValueError(f"{where}: the layer is not built; call it on an input or build it")
        if bidirectional and (lstms[0].go_backwards or not lstms[1].go_backwards):
            raise ValueError(
                f"{where}: expected a Bidirectional whose forward_layer runs forwards and whose "
                "backward_layer runs backwards (go_backwards False, True); received "
                f"{lstms[0].go_backwards}, {lstms[1].go_backwards}"
            )
        kinds.append(bidirectional)
    if len(set(kinds)) > 1:
        raise ValueError(
            "layer_or_layers: expected a stack of LSTM layers or one of Bidirectional(LSTM) "
            "layers, as BandedLSTM has one `bidirectional`; received both"
        )
    return layers, names, kinds[0]


def from_keras_lstm(layer_or_layers: Any) -> dict[str, Any]:
    """``BandedLSTM`` variables from one built ``keras.layers.LSTM`` or
    ``keras.layers.Bidirectional(LSTM)``, or a list of them for a stack (first
    layer first; all LSTM or all Bidirectional).

    ``BandedLSTM(**keras_lstm_options(layer_or_layers)).apply(variables, None,
    x)`` on ``x [batch, bands, time, features]`` then equals the Keras stack
    on each ``x[:, band]``: any activations, with or without biases, forwards,
    backwards or both ways.

    Returns:
      ``{'params': {'layer_{i}': {'kernel', 'recurrent_kernel', 'bias'}}}``
      (no ``bias`` with ``use_bias=False``; the backward layer of a
      ``Bidirectional`` under ``layer_{i}_reverse``).

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
    layers, names, _ = _keras_entries(layer_or_layers)
    # Not get_weights(): Keras 3.15's Variable.numpy() warns under NumPy 2.
    stack = [
        tuple(
            tuple(keras.ops.convert_to_numpy(w.value) for w in lstm.weights)
            for lstm in _keras_directions(layer)
        )
        for layer in layers
    ]

    def where(i: int, direction: int, weight: str) -> str:
        lstm = "backward_layer" if direction else "forward_layer"
        return f"{names[i]}{'.' + lstm if len(stack[i]) == 2 else ''}.{weight}"

    return make_variables(check_stack(stack, "layer_or_layers", where))


_KERAS_SAME = (
    "units",
    "activation",
    "recurrent_activation",
    "use_bias",
    "dropout",
    "recurrent_dropout",
    "go_backwards",
    "zero_output_for_mask",
)
"""The ``keras.layers.LSTM`` settings every layer of a stack must share: one
``BandedLSTM`` argument each."""


def keras_lstm_options(layer_or_layers: Any) -> dict[str, Any]:
    """The ``BandedLSTM`` arguments that compute as the Keras layer(s) do:
    ``units``, ``num_layers``, ``activation``, ``recurrent_activation``,
    ``use_bias``, ``dropout``, ``recurrent_dropout``, ``zero_output_for_mask``
    and ``reverse`` (``go_backwards``) or ``bidirectional`` with
    ``merge_mode``. An activation goes by its name where ``banded_rnn`` has
    it, else as the Keras function.

    ``layer_or_layers`` is what ``from_keras_lstm`` takes; every layer of a
    stack must share those settings. ``merge_mode=None`` (a pair of outputs)
    is a ``ValueError``: take ``"concat"`` and split the last axis in halves.
    So is a stack of several ``go_backwards=True`` layers: each reverses the
    last one's reversed outputs, so their directions alternate, while every
    layer of ``BandedLSTM(reverse=True)`` runs backwards.

    >>> import keras
    >>> lstm = keras.layers.Bidirectional(keras.layers.LSTM(8, activation="relu"), merge_mode="sum")
    >>> lstm.build((None, None, 4))
    >>> options = keras_lstm_options(lstm)
    >>> options["bidirectional"], options["merge_mode"], options["activation"]
    (True, 'sum', 'relu')
    """
    layers, names, bidirectional = _keras_entries(layer_or_layers)
    settings = []
    for layer, where in zip(layers, names, strict=True):
        forward, *backward = (_keras_settings(lstm) for lstm in _keras_directions(layer))
        for option, value in backward[0].items() if backward else ():
            if option != "go_backwards" and not _same(value, forward[option]):
                raise ValueError(
                    f"{where}.backward_layer: expected the forward layer's {option}, as "
                    f"BandedLSTM has one for both directions; the forward layer has "
                    f"{forward[option]!r}, the backward layer {value!r}"
                )
        config = forward
        if bidirectional:
            if layer.merge_mode is None:
                raise ValueError(
                    f"{where}: merge_mode=None returns the directions as a pair, which one "
                    "BandedLSTM output cannot be; use merge_mode='concat' and split the last "
                    "axis in halves"
                )
            config["merge_mode"] = layer.merge_mode
        settings.append(config)
    for i, config in enumerate(settings[1:], 1):
        for option, value in config.items():
            if not _same(value, settings[0][option]):
                raise ValueError(
                    f"{names[i]}: every layer of a stack must have the same {option}, as "
                    f"BandedLSTM has one; layer 0 has {settings[0][option]!r}, layer {i} has "
                    f"{value!r}"
                )
    options = dict(settings[0], num_layers=len(layers))
    go_backwards = options.pop("go_backwards")
    if go_backwards and len(layers) > 1:
        raise ValueError(
            "layer_or_layers: a stack of separate go_backwards=True layers alternates "
            "directions (each reverses its input, the last one's reversed outputs), while "
            "BandedLSTM(reverse=True) runs every layer backwards, as one "
            "keras.layers.RNN(StackedRNNCells(...), go_backwards=True); the weights "
            "convert, but no BandedLSTM computes as this stack"
        )
    if bidirectional:
        options["bidirectional"] = True
    else:
        options["reverse"] = go_backwards
    return options


def _keras_settings(lstm: Any) -> dict[str, Any]:
    """The settings of one ``keras.layers.LSTM`` that ``BandedLSTM`` has as arguments."""
    config = {option: getattr(lstm, option) for option in _KERAS_SAME}
    for option in ("activation", "recurrent_activation"):
        config[option] = activation_name(config[option])
    return config


def _same(a: Any, b: Any) -> bool:
    """Equal settings: the same object (functions) or equal values."""
    return a is b or a == b


def activation_name(activation: Callable[..., Any]) -> Any:
    """A Keras activation as ``BandedLSTM`` takes it: its name where it is the
    Keras function of one of ``banded_rnn``'s names (the same function in JAX,
    and the native kernel for tanh and sigmoid), else the function itself."""
    for name in ACTIVATIONS:
        if keras.activations.get(name) is activation:
            return name
    return activation


def to_keras_lstm(variables: Any) -> list[list[np.ndarray]]:
    """The weight lists of the Keras layers, one per layer of ``variables``: for
    ``keras.layers.LSTM``, or for ``keras.layers.Bidirectional(LSTM)`` if the
    stack is bidirectional (the forward layer's weights, then the backward
    layer's, as ``Bidirectional.set_weights`` takes them).

    ``for lstm, weights in zip(lstms, to_keras_lstm(variables)):
    lstm.set_weights(weights)`` gives each Keras layer (with the same units and
    ``use_bias``, built on the right number of features) exactly the weights
    of that layer. A one-layer model gives a list of one list.

    >>> import jax, keras, numpy as np
    >>> from banded_rnn import BandedLSTM
    >>> variables = BandedLSTM(8).init(jax.random.key(0), None, np.zeros((1, 3, 1, 4)))
    >>> lstm = keras.layers.LSTM(8)
    >>> lstm.build((None, None, 4))                    # [batch, time, features]
    >>> lstm.set_weights(to_keras_lstm(variables)[0])
    """
    return [
        [np.asarray(w) for weights in layer for w in weights] for layer in stack_weights(variables)
    ]


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


def _torch_state_dict(state_dict: Any, name: str) -> Mapping[str, Any]:
    """The mapping of a state dict, or of a module's ``state_dict()``."""
    if not isinstance(state_dict, Mapping) and callable(getattr(state_dict, "state_dict", None)):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{name}: expected a mapping such as torch.nn.LSTM.state_dict(), or the LSTM; "
            f"received {type(state_dict).__name__}"
        )
    return state_dict


def from_torch_lstm(state_dict: Any) -> dict[str, Any]:
    """``BandedLSTM`` variables from a ``torch.nn.LSTM``'s ``state_dict()``.

    ``BandedLSTM(**torch_lstm_options(state_dict)).apply(variables, None, x)``
    on ``x [batch, bands, time, features]`` then equals the torch LSTM on each
    ``x[:, band]`` (``batch_first=True``; the state is PyTorch's ``h_n`` and
    ``c_n`` in the same order: layer 0 forward, layer 0 backward, layer 1 ...).

    Args:
      state_dict: a mapping with ``weight_ih_l{k} [4 * units, features]``,
        ``weight_hh_l{k} [4 * units, units]`` and, unless the LSTM was built
        with ``bias=False``, ``bias_ih_l{k}`` and ``bias_hh_l{k}`` ``[4 *
        units]``, for ``k = 0 .. num_layers - 1``, and the same with
        ``_reverse`` for a bidirectional LSTM: torch tensors or NumPy arrays.
        A ``torch.nn.LSTM`` itself is accepted too. ``proj_size``
        (``weight_hr_l{k}``) has no counterpart in ``BandedLSTM`` and raises a
        ``ValueError``.

    Returns:
      ``{'params': {'layer_{k}': {'kernel', 'recurrent_kernel', 'bias'}}}``
      (and ``layer_{k}_reverse``) with ``kernel = weight_ih.T``,
      ``recurrent_kernel = weight_hh.T`` and ``bias = bias_ih + bias_hh``
      (no ``bias`` for ``bias=False``).

    >>> import numpy as np, torch
    >>> from banded_rnn import BandedLSTM
    >>> lstm = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True, bidirectional=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype("float32")
    >>> with torch.no_grad():
    ...     band_0 = lstm(torch.from_numpy(x[:, 0]))[0].numpy()  # [batch, time, 2 * units]
    >>> model = BandedLSTM(**torch_lstm_options(lstm))
    >>> _, y = model.apply(from_torch_lstm(lstm), None, x)
    >>> bool(np.allclose(y[:, 0], band_0, atol=1e-5))
    True
    """
    state_dict = _torch_state_dict(state_dict, "state_dict")
    return make_variables(check_stack(_torch_stack(state_dict), "state_dict", _torch_where))


def _torch_where(i: int, direction: int, weight: str) -> str:
    """The torch key of layer ``i``'s weight in ``direction``, for errors."""
    key = {"kernel": "weight_ih", "recurrent_kernel": "weight_hh", "bias": "bias_ih"}[weight]
    return f"state_dict['{key}_l{i}{_SUFFIXES[direction]}']"


def _torch_stack(state_dict: Mapping[str, Any]) -> Stack:
    """The weights of every layer and direction of a torch state dict, in
    ``BandedLSTM``'s layout; keys it cannot hold raise."""
    entries: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        match = _TORCH_KEY.match(str(key))
        if match is None:
            raise ValueError(
                f"state_dict: unexpected key {key!r}; expected weight_ih_l{{k}}, "
                "weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}, each optionally with _reverse"
            )
        kind, layer, reverse = match.groups()
        if kind == "weight_hr":
            raise ValueError(
                f"state_dict: key {key!r} belongs to a torch.nn.LSTM with proj_size > 0; "
                "BandedLSTM has no projection of the hidden state (proj_size=0)"
            )
        entries.setdefault((int(layer), int(bool(reverse))), {})[kind] = _to_numpy(value)
    directions = 2 if any(d for _, d in entries) else 1
    num_layers = len(entries) // directions
    expected = [(k, d) for k in range(num_layers) for d in range(directions)]
    if not entries or sorted(entries) != expected:
        received = [f"l{k}{_SUFFIXES[d]}" for k, d in sorted(entries)]
        raise ValueError(
            f"state_dict: expected layers l0 ... l{{n - 1}}, each with _reverse if any has "
            f"(a bidirectional LSTM); received {received}"
        )
    return [
        tuple(_torch_weights(entries[k, d], f"l{k}{_SUFFIXES[d]}") for d in range(directions))
        for k in range(num_layers)
    ]


def _torch_weights(entry: Mapping[str, np.ndarray], layer: str) -> Weights:
    """One direction of one torch layer: the weights transposed, the biases summed."""
    for kind in ("weight_ih", "weight_hh"):
        if kind not in entry:
            raise ValueError(f"state_dict: missing {kind}_{layer}")
    weight_ih, weight_hh = entry["weight_ih"], entry["weight_hh"]
    if weight_hh.ndim != 2 or weight_hh.shape[0] != 4 * weight_hh.shape[1]:
        raise ValueError(
            f"state_dict['weight_hh_{layer}']: expected shape [4 * units, units]; "
            f"received {weight_hh.shape}"
        )
    units = weight_hh.shape[1]
    if weight_ih.ndim != 2 or weight_ih.shape[0] != 4 * units:
        raise ValueError(
            f"state_dict['weight_ih_{layer}']: expected shape [4 * units, features] = "
            f"({4 * units}, features); received {weight_ih.shape}"
        )
    biases = [entry.get(kind) for kind in ("bias_ih", "bias_hh")]
    if sum(b is None for b in biases) == 1:
        raise ValueError(
            f"state_dict: layer {layer} has only one of bias_ih_{layer}, bias_hh_{layer}"
        )
    if biases[0] is None:
        return weight_ih.T, weight_hh.T
    for kind, b in zip(("bias_ih", "bias_hh"), biases, strict=True):
        if b.shape != (4 * units,):
            raise ValueError(
                f"state_dict['{kind}_{layer}']: expected shape ({4 * units},); received {b.shape}"
            )
    return weight_ih.T, weight_hh.T, biases[0] + biases[1]


def torch_lstm_options(lstm_or_state_dict: Any) -> dict[str, Any]:
    """The ``BandedLSTM`` arguments that compute as a ``torch.nn.LSTM`` does:
    ``units``, ``num_layers``, ``use_bias`` and ``bidirectional`` (its
    directions concatenated, ``merge_mode='concat'``), from the LSTM or its
    ``state_dict()``.

    PyTorch's ``dropout`` is left out: it drops between layers, a fresh mask
    per step, while ``BandedLSTM``'s drops each layer's inputs with one mask
    per sequence (Keras's variational dropout). ``batch_first`` does not
    matter, as ``BandedLSTM`` takes ``[batch, bands, time, features]`` (or
    ``time_major=True``, ``[time, batch, bands, features]``).

    >>> import torch
    >>> torch_lstm_options(torch.nn.LSTM(4, 8, num_layers=2, bias=False, bidirectional=True))
    {'units': 8, 'num_layers': 2, 'use_bias': False, 'bidirectional': True, 'merge_mode': 'concat'}
    """
    state_dict = _torch_state_dict(lstm_or_state_dict, "lstm_or_state_dict")
    stack = check_stack(_torch_stack(state_dict), "lstm_or_state_dict", _torch_where)
    options = {
        "units": int(np.shape(stack[0][0][1])[0]),
        "num_layers": len(stack),
        "use_bias": len(stack[0][0]) == 3,
    }
    if len(stack[0]) == 2:
        options.update(bidirectional=True, merge_mode="concat")
    return options


def to_torch_lstm(variables: Any, tensors: bool = True) -> dict[str, Any]:
    """A ``state_dict`` for ``torch.nn.LSTM(features, units, num_layers,
    bias=use_bias, bidirectional=bidirectional)``.

    ``torch_lstm.load_state_dict(to_torch_lstm(variables))`` gives the torch
    LSTM (either ``batch_first``) the weights of every layer and direction;
    the whole bias goes to ``bias_ih_l{k}`` and ``bias_hh_l{k}`` is zero. A
    bidirectional stack must concatenate its directions (PyTorch's only
    merge): one whose later layers read ``units`` features (``merge_mode``
    sum, mul or ave) is a ``ValueError``.

    Args:
      variables: ``BandedLSTM`` variables.
      tensors: return torch tensors (imports torch); ``False`` gives NumPy arrays.

    >>> import jax, numpy as np, torch
    >>> from banded_rnn import BandedLSTM
    >>> variables = BandedLSTM(8).init(jax.random.key(0), None, np.zeros((1, 3, 1, 4)))
    >>> torch.nn.LSTM(4, 8).load_state_dict(to_torch_lstm(variables))
    <All keys matched successfully>
    """
    stack = stack_weights(variables)
    units = np.shape(stack[0][0][1])[0]
    if len(stack) > 1 and len(stack[0]) == 2 and np.shape(stack[1][0][0])[0] != 2 * units:
        raise ValueError(
            "variables: layer 1 of this bidirectional stack reads "
            f"{np.shape(stack[1][0][0])[0]} features, the merged (summed, multiplied or "
            f"averaged) directions; torch.nn.LSTM concatenates them ({2 * units} features), "
            "so only a stack with merge_mode='concat' converts"
        )
    state_dict = {}
    for k, layer in enumerate(stack):
        for suffix, weights in zip(_SUFFIXES, layer, strict=False):
            state_dict[f"weight_ih_l{k}{suffix}"] = np.ascontiguousarray(np.asarray(weights[0]).T)
            state_dict[f"weight_hh_l{k}{suffix}"] = np.ascontiguousarray(np.asarray(weights[1]).T)
            if len(weights) == 3:
                bias = np.asarray(weights[2])
                state_dict[f"bias_ih_l{k}{suffix}"] = bias.copy()
                state_dict[f"bias_hh_l{k}{suffix}"] = np.zeros_like(bias)
    if tensors:
        import torch

        state_dict = {key: torch.from_numpy(value) for key, value in state_dict.items()}
    return state_dict
