"""Weights from and to a real keras.layers.LSTM and a real torch.nn.LSTM: every band
of BandedLSTMLayer then equals that LSTM run on the band alone."""

import os

# Keras reads its backend once, at its first import.
os.environ.setdefault("KERAS_BACKEND", "jax")

import subprocess
import sys

import jax
import keras
import numpy as np
import pytest

import interop
from banded_rnn import BandedLSTM
from interop import BandedLSTMLayer

from helpers import init_model, random_inputs

torch = pytest.importorskip("torch")

ATOL = 1e-5


@pytest.fixture(autouse=True)
def keras_rank_promotion():
    """keras.layers.LSTM relies on implicit rank promotion, an error under conftest."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _keras_weights(layer):
    # Not get_weights(): Keras 3.15's Variable.numpy() warns under NumPy 2.
    return [keras.ops.convert_to_numpy(w.value) for w in layer.weights]


def _keras_stack(features, units, num_layers, seed):
    """Built keras.layers.LSTM layers with random weights and biases."""
    rng = np.random.default_rng(seed)
    lstms = []
    for i in range(num_layers):
        lstm = keras.layers.LSTM(units, return_sequences=True, return_state=True)
        lstm.build((None, None, features if i == 0 else units))
        lstm.set_weights([w + 0.3 * rng.standard_normal(w.shape) for w in _keras_weights(lstm)])
        lstms.append(lstm)
    return lstms


def _layer_with(variables, units, num_layers):
    layer = BandedLSTMLayer(units, num_layers=num_layers, return_state=True)
    layer.set_flax_variables(variables)
    return layer


@pytest.mark.parametrize("num_layers", [1, 2])
def test_from_keras_lstm_runs_every_band_like_the_keras_lstm(num_layers):
    batch, bands, time, features, units = 2, 3, 9, 4, 5
    lstms = _keras_stack(features, units, num_layers, seed=num_layers)
    x = random_inputs(20, (batch, bands, time, features))
    variables = interop.from_keras_lstm(lstms if num_layers > 1 else lstms[0])
    y, state = _layer_with(variables, units, num_layers)(x)
    for band in range(bands):
        sequence = x[:, band]
        for layer, lstm in enumerate(lstms):
            sequence, hidden, cell = (np.asarray(a) for a in lstm(sequence))
            np.testing.assert_allclose(state[layer].hidden[:, band], hidden, atol=ATOL)
            np.testing.assert_allclose(state[layer].cell[:, band], cell, atol=ATOL)
        np.testing.assert_allclose(y[:, band], sequence, atol=ATOL)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_keras_round_trips_are_exact(num_layers):
    lstms = _keras_stack(3, 4, num_layers, seed=7)
    variables = interop.from_keras_lstm(lstms)
    weights = interop.to_keras_lstm(variables)
    assert len(weights) == num_layers
    for lstm, layer_weights in zip(lstms, weights, strict=True):
        for ours, theirs in zip(layer_weights, _keras_weights(lstm), strict=True):
            np.testing.assert_array_equal(ours, theirs)

    variables = init_model(BandedLSTM(4, num_layers=num_layers), random_inputs(0, (1, 1, 2, 3)))
    for lstm, layer_weights in zip(lstms, interop.to_keras_lstm(variables), strict=True):
        lstm.set_weights(layer_weights)
    jax.tree.map(np.testing.assert_array_equal, interop.from_keras_lstm(lstms), variables)


def _torch_lstm(features, units, num_layers, seed, bias=True):
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(features, units, num_layers, bias=bias, batch_first=True)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias"):
                p.normal_(0.0, 0.5)  # the default init is too small to catch a wrong slice
    return lstm


def _torch_per_band(lstm, x):
    """Runs the torch LSTM on every band: outputs [batch, bands, time, units] and
    (h, c) each [num_layers, batch, bands, units]."""
    with torch.no_grad():
        runs = [lstm(torch.from_numpy(x[:, band])) for band in range(x.shape[1])]
    outputs = np.stack([y.numpy() for y, _ in runs], axis=1)
    hidden = np.stack([h.numpy() for _, (h, _) in runs], axis=2)
    cell = np.stack([c.numpy() for _, (_, c) in runs], axis=2)
    return outputs, hidden, cell


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_from_torch_lstm_runs_every_band_like_the_torch_lstm(num_layers, as_numpy):
    batch, bands, time, features, units = 2, 3, 8, 4, 5
    lstm = _torch_lstm(features, units, num_layers, seed=num_layers)
    state_dict = lstm.state_dict()
    if as_numpy:
        state_dict = {key: value.numpy() for key, value in state_dict.items()}
    x = random_inputs(21, (batch, bands, time, features))
    y, state = _layer_with(interop.from_torch_lstm(state_dict), units, num_layers)(x)
    outputs, hidden, cell = _torch_per_band(lstm, x)
    np.testing.assert_allclose(y, outputs, atol=ATOL)
    for layer in range(num_layers):
        np.testing.assert_allclose(state[layer].hidden, hidden[layer], atol=ATOL)
        np.testing.assert_allclose(state[layer].cell, cell[layer], atol=ATOL)


def test_from_torch_lstm_accepts_the_module_and_bias_false():
    lstm = _torch_lstm(3, 4, 2, seed=5, bias=False)
    x = random_inputs(22, (1, 2, 6, 3))
    variables = interop.from_torch_lstm(lstm)
    assert not np.asarray(variables["params"]["layer_1"]["bias"]).any()
    _, core = BandedLSTM(4, num_layers=2).apply(variables, None, x)
    np.testing.assert_allclose(core, _torch_per_band(lstm, x)[0], atol=ATOL)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_to_torch_lstm_loads_into_torch_and_round_trips_exactly(num_layers):
    x = random_inputs(23, (2, 3, 7, 4))
    variables = init_model(BandedLSTM(5, num_layers=num_layers), x, seed=8)
    state_dict = interop.to_torch_lstm(variables)
    assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
    lstm = torch.nn.LSTM(4, 5, num_layers, batch_first=True)
    lstm.load_state_dict(state_dict)
    _, core = BandedLSTM(5, num_layers=num_layers).apply(variables, None, x)
    np.testing.assert_allclose(core, _torch_per_band(lstm, x)[0], atol=ATOL)

    jax.tree.map(np.testing.assert_array_equal, interop.from_torch_lstm(state_dict), variables)
    arrays = interop.to_torch_lstm(variables, tensors=False)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch_lstm(arrays), variables)


def test_numpy_state_dicts_never_import_torch():
    code = (
        "import sys, numpy as np, interop\n"
        "rng = np.random.default_rng(0)\n"
        "sd = {'weight_ih_l0': rng.standard_normal((8, 3)), 'weight_hh_l0': "
        "rng.standard_normal((8, 2)), 'bias_ih_l0': np.ones(8), 'bias_hh_l0': np.ones(8)}\n"
        "v = interop.from_torch_lstm(sd)\n"
        "interop.from_torch_lstm(interop.to_torch_lstm(v, tensors=False))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_unsupported_torch_options_are_clear_errors():
    bidirectional = torch.nn.LSTM(3, 4, bidirectional=True).state_dict()
    with pytest.raises(ValueError, match=r"weight_ih_l0_reverse.*bidirectional"):
        interop.from_torch_lstm(bidirectional)
    projected = torch.nn.LSTM(3, 4, proj_size=2).state_dict()
    with pytest.raises(ValueError, match=r"weight_hr_l0.*proj_size"):
        interop.from_torch_lstm(projected)
    with pytest.raises(TypeError, match=r"state_dict: expected a mapping.*list"):
        interop.from_torch_lstm([1, 2])
    good = torch.nn.LSTM(3, 4, 2).state_dict()
    with pytest.raises(ValueError, match=r"unexpected key 'weight'"):
        interop.from_torch_lstm({**good, "weight": good["weight_ih_l0"]})
    with pytest.raises(ValueError, match=r"missing weight_hh_l1"):
        interop.from_torch_lstm({k: v for k, v in good.items() if k != "weight_hh_l1"})
    with pytest.raises(ValueError, match=r"only one of bias_ih_l0, bias_hh_l0"):
        interop.from_torch_lstm({k: v for k, v in good.items() if k != "bias_hh_l0"})
    with pytest.raises(ValueError, match=r"weight_ih_l0'\]: expected shape \[4 \* units"):
        interop.from_torch_lstm({**good, "weight_ih_l0": good["weight_ih_l0"][:8]})


def test_unsupported_keras_layers_are_clear_errors():
    with pytest.raises(TypeError, match=r"expected a keras.layers.LSTM.*GRU"):
        interop.from_keras_lstm(keras.layers.GRU(3))
    with pytest.raises(ValueError, match=r"not built"):
        interop.from_keras_lstm(keras.layers.LSTM(3))
    relu = keras.layers.LSTM(3, activation="relu")
    relu.build((None, None, 2))
    with pytest.raises(ValueError, match=r"activation='tanh'.*'relu'"):
        interop.from_keras_lstm(relu)
    no_bias = keras.layers.LSTM(3, use_bias=False)
    no_bias.build((None, None, 2))
    with pytest.raises(ValueError, match=r"use_bias=True"):
        interop.from_keras_lstm(no_bias)
    first, second = keras.layers.LSTM(3), keras.layers.LSTM(4)
    first.build((None, None, 2))
    second.build((None, None, 3))
    with pytest.raises(ValueError, match=r"same units.*layer 0 has 3, layer 1 has 4"):
        interop.from_keras_lstm([first, second])


def test_malformed_variables_are_clear_errors():
    variables = init_model(BandedLSTM(4, num_layers=2), random_inputs(0, (1, 1, 2, 3)))
    with pytest.raises(TypeError, match=r"variables: expected BandedLSTM variables"):
        interop.to_keras_lstm(variables["params"])
    params = dict(variables["params"])
    del params["layer_0"]
    with pytest.raises(ValueError, match=r"keys layer_0 ... layer_\{n - 1\}.*\['layer_1'\]"):
        interop.to_torch_lstm({"params": params}, tensors=False)
    layer_1 = {**variables["params"]["layer_1"], "bias": np.zeros(12, "float32")}
    with pytest.raises(ValueError, match=r"layer_1'\]\['bias'\]: expected shape \(16,\).*\(12,\)"):
        interop.to_keras_lstm({"params": {**variables["params"], "layer_1": layer_1}})
