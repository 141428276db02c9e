"""Weights from and to a real keras.layers.LSTM and a real torch.nn.LSTM: every band
of BandedLSTMLayer then equals that LSTM run on the band alone."""

from pathlib import Path

import jax
import keras
import numpy as np
import pytest

import interop
from banded_rnn import BandedLSTM, LSTMState
from interop import BandedLSTMLayer

from helpers import init_model, random_inputs, run_script

torch = pytest.importorskip("torch")

ATOL = 1e-5


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


def _randomise(layer, seed):
    """Random weights (biases included) for a built Keras layer."""
    rng = np.random.default_rng(seed)
    layer.set_weights([0.5 * rng.standard_normal(w.shape) for w in _keras_weights(layer)])


@pytest.mark.parametrize(
    "options",
    [
        {"activation": "relu", "recurrent_activation": "hard_sigmoid", "use_bias": False},
        {"go_backwards": True, "activation": "softsign"},
        {"go_backwards": True, "zero_output_for_mask": True, "use_bias": False},
    ],
    ids=["relu-no-bias", "backwards-softsign", "backwards-zero-output"],
)
def test_keras_lstm_options_run_as_the_keras_stack(options):
    """Any activations, use_bias and go_backwards: the Keras LSTMs (two stacked,
    one going backwards) on each band, with a mask with a hole, equal
    BandedLSTM(**keras_lstm_options)."""
    batch, bands, time, features, units = 2, 3, 6, 3, 4
    lstms = []
    for i in range(1 if options.get("go_backwards") else 2):
        lstm = keras.layers.LSTM(units, return_sequences=True, return_state=True, **options)
        lstm.build((None, None, features if i == 0 else units))
        _randomise(lstm, seed=30 + i)
        lstms.append(lstm)
    kwargs = interop.keras_lstm_options(lstms)
    assert kwargs["reverse"] == options.get("go_backwards", False)
    assert kwargs["use_bias"] == options.get("use_bias", True)
    x = random_inputs(27, (batch, bands, time, features))
    mask = np.ones((batch, time), bool)
    mask[0, 2] = mask[1, 4:] = False
    final, y = BandedLSTM(**kwargs).apply(interop.from_keras_lstm(lstms), None, x, mask=mask)
    for band in range(bands):
        sequence = x[:, band]
        for layer, lstm in enumerate(lstms):
            sequence, hidden, cell = (np.asarray(a) for a in lstm(sequence, mask=mask))
            np.testing.assert_allclose(final[layer].hidden[:, band], hidden, atol=ATOL)
            np.testing.assert_allclose(final[layer].cell[:, band], cell, atol=ATOL)
        np.testing.assert_allclose(y[:, band], sequence, atol=ATOL)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave"])
def test_keras_bidirectional_stacks_convert_both_ways(merge_mode):
    """A stack of two Keras Bidirectional(LSTM), every merge mode, with a mask:
    outputs per band, and to_keras_lstm's weight lists load back exactly."""
    batch, bands, time, features, units = 2, 2, 5, 3, 4
    width = 2 * units if merge_mode == "concat" else units
    layers = []
    for i in range(2):
        lstm = keras.layers.LSTM(units, return_sequences=True, use_bias=i == 0)
        layer = keras.layers.Bidirectional(lstm, merge_mode=merge_mode)
        layer.build((None, None, features if i == 0 else width))
        _randomise(layer, seed=40 + i)
        layers.append(layer)
    with pytest.raises(ValueError, match=r"layer_or_layers: every layer must have a bias or none"):
        interop.from_keras_lstm(layers)
    layers[1] = keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True), merge_mode=merge_mode
    )
    layers[1].build((None, None, width))
    _randomise(layers[1], seed=42)

    kwargs = interop.keras_lstm_options(layers)
    assert kwargs["bidirectional"] and kwargs["merge_mode"] == merge_mode
    variables = interop.from_keras_lstm(layers)
    x = random_inputs(28, (batch, bands, time, features))
    mask = np.ones((batch, time), bool)
    mask[1, 3:] = False
    _, y = BandedLSTM(**kwargs).apply(variables, None, x, mask=mask)
    for band in range(bands):
        expected = layers[1](layers[0](x[:, band], mask=mask), mask=mask)
        np.testing.assert_allclose(y[:, band], expected, atol=ATOL)

    ours = init_model(BandedLSTM(**kwargs), x, seed=10)
    for layer, weights in zip(layers, interop.to_keras_lstm(ours), strict=True):
        layer.set_weights(weights)
    jax.tree.map(np.testing.assert_array_equal, interop.from_keras_lstm(layers), ours)


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
    assert all(
        sorted(layer) == ["kernel", "recurrent_kernel"] for layer in variables["params"].values()
    )
    options = interop.torch_lstm_options(lstm)
    assert options == {"units": 4, "num_layers": 2, "use_bias": False}
    _, core = BandedLSTM(**options).apply(variables, None, x)
    np.testing.assert_allclose(core, _torch_per_band(lstm, x)[0], atol=ATOL)
    state_dict = interop.to_torch_lstm(variables)
    assert sorted(state_dict) == sorted(lstm.state_dict())
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch_lstm(state_dict), variables)


@pytest.mark.parametrize("bias", [True, False])
def test_bidirectional_torch_lstm_with_its_state_order(bias):
    """torch.nn.LSTM(bidirectional=True, num_layers=2): outputs, and h_n / c_n
    indexed layer * 2 + direction, both ways through the converters."""
    batch, bands, time, features, units = 2, 3, 7, 4, 5
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(features, units, 2, bias=bias, batch_first=True, bidirectional=True)
    x = random_inputs(24, (batch, bands, time, features))
    h0 = random_inputs(25, (4, batch, bands, units))
    c0 = random_inputs(26, (4, batch, bands, units))
    with torch.no_grad():
        runs = [
            lstm(torch.from_numpy(x[:, b]), (torch.from_numpy(h0[:, :, b].copy()),
                                             torch.from_numpy(c0[:, :, b].copy())))
            for b in range(bands)
        ]  # fmt: skip
    outputs = np.stack([y.numpy() for y, _ in runs], axis=1)
    h_n = np.stack([h.numpy() for _, (h, _) in runs], axis=2)
    c_n = np.stack([c.numpy() for _, (_, c) in runs], axis=2)

    options = interop.torch_lstm_options(lstm.state_dict())
    assert options == {
        "units": units, "num_layers": 2, "use_bias": bias, "bidirectional": True,
        "merge_mode": "concat",
    }  # fmt: skip
    variables = interop.from_torch_lstm(lstm)
    assert sorted(variables["params"]) == [
        "layer_0", "layer_0_reverse", "layer_1", "layer_1_reverse"
    ]  # fmt: skip
    state = tuple(LSTMState(h0[k], c0[k]) for k in range(4))
    final, y = BandedLSTM(**options).apply(variables, state, x)
    np.testing.assert_allclose(y, outputs, atol=ATOL)
    for k in range(4):
        np.testing.assert_allclose(final[k].hidden, h_n[k], atol=ATOL)
        np.testing.assert_allclose(final[k].cell, c_n[k], atol=ATOL)

    ours = init_model(BandedLSTM(**options), x, seed=9)
    lstm.load_state_dict(interop.to_torch_lstm(ours))
    _, y = BandedLSTM(**options).apply(ours, None, x)
    np.testing.assert_allclose(y, _torch_per_band(lstm, x)[0], atol=ATOL)
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch_lstm(lstm), ours)


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
    run_script(Path(__file__).parent / "scripts" / "numpy_state_dicts.py", timeout=300)


def test_unsupported_torch_options_are_clear_errors():
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
    both = torch.nn.LSTM(3, 4, 2, bidirectional=True).state_dict()
    with pytest.raises(ValueError, match=r"each with _reverse.*'l1_reverse'\]"):
        interop.from_torch_lstm({k: v for k, v in both.items() if not k.endswith("l0_reverse")})
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l1'\]: layer 1 reads.*8"):
        interop.from_torch_lstm({**both, "weight_ih_l1": both["weight_ih_l1"][:, :5]})
    summed = init_model(
        BandedLSTM(4, num_layers=2, bidirectional=True, merge_mode="sum"),
        random_inputs(0, (1, 1, 2, 3)),
    )
    with pytest.raises(ValueError, match=r"torch.nn.LSTM concatenates.*merge_mode='concat'"):
        interop.to_torch_lstm(summed, tensors=False)


def test_unsupported_keras_layers_are_clear_errors():
    with pytest.raises(TypeError, match=r"expected a keras.layers.LSTM.*GRU"):
        interop.from_keras_lstm(keras.layers.GRU(3))
    with pytest.raises(TypeError, match=r"received Bidirectional\(GRU\)"):
        interop.from_keras_lstm(keras.layers.Bidirectional(keras.layers.GRU(3)))
    with pytest.raises(ValueError, match=r"not built"):
        interop.from_keras_lstm(keras.layers.LSTM(3))
    first, second = keras.layers.LSTM(3), keras.layers.LSTM(4)
    first.build((None, None, 2))
    second.build((None, None, 3))
    with pytest.raises(ValueError, match=r"same units.*\(3, 12\).*\(4, 16\)"):
        interop.from_keras_lstm([first, second])
    relu = keras.layers.LSTM(3, activation="relu")
    relu.build((None, None, 3))
    with pytest.raises(ValueError, match=r"\[1\]: every layer.*same activation.*'tanh'.*'relu'"):
        interop.keras_lstm_options([first, relu])
    both = keras.layers.Bidirectional(keras.layers.LSTM(3), merge_mode=None)
    both.build((None, None, 3))
    with pytest.raises(ValueError, match=r"LSTM layers or one of Bidirectional.*both"):
        interop.from_keras_lstm([first, both])
    with pytest.raises(ValueError, match=r"merge_mode=None.*'concat' and split"):
        interop.keras_lstm_options(both)
    mixed = keras.layers.Bidirectional(
        keras.layers.LSTM(3), backward_layer=keras.layers.LSTM(3, "relu", go_backwards=True)
    )
    mixed.build((None, None, 3))
    with pytest.raises(ValueError, match=r"backward_layer: expected the forward.*'tanh'.*'relu'"):
        interop.keras_lstm_options(mixed)
    backwards = [keras.layers.LSTM(3, go_backwards=True) for _ in range(2)]
    backwards[0].build((None, None, 2))
    backwards[1].build((None, None, 3))
    with pytest.raises(ValueError, match=r"alternates directions.*StackedRNNCells"):
        interop.keras_lstm_options(backwards)
    assert sorted(interop.from_keras_lstm(both)["params"]) == ["layer_0", "layer_0_reverse"]


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
