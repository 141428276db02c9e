"""BandedLSTMLayer, alone and in keras.layers.Bidirectional, against real Keras layers
with the same weights: keras.layers.LSTM and keras.layers.Bidirectional(LSTM) run on
every band alone, across Keras's arguments, masks, regularizers, constraints in fit,
saving and symbolic shapes. Every number is checked against Keras, never against our
own output."""

import dataclasses
from functools import partial

import jax
import keras
import numpy as np
import pytest

import interop
from banded_rnn import LSTMState
from interop import BandedLSTMLayer

from helpers import random_inputs

ATOL = 1e-5
BATCH, BANDS, TIME, FEATURES, UNITS = 2, 2, 6, 3, 4
MASK_VALUE = 0.5

# Keras 3.15's Variable.__array__ lacks NumPy 2's `copy` keyword, and saving calls it.
_SAVING_WARNING = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _scaled_tanh(x):
    """A custom activation: a plain callable, no name Keras or banded_rnn knows."""
    return 1.5 * keras.ops.tanh(0.8 * x)


ACTIVATIONS = {
    "default": {},
    "relu": {"activation": "relu", "recurrent_activation": "hard_sigmoid"},
    "custom": {"activation": _scaled_tanh},
}


# -- helpers ------------------------------------------------------------------------------


def _np(a):
    return np.asarray(keras.ops.convert_to_numpy(a))


def _random_weights(features, units=UNITS, use_bias=True, seed=0):
    """Keras LSTM weights ``[kernel, recurrent_kernel, (bias)]``, all random (the
    biases too, so that a wrong gate slice shows)."""
    rng = np.random.default_rng(seed)
    shapes = [(features, 4 * units), (units, 4 * units), (4 * units,)]
    return [0.5 * rng.standard_normal(s).astype("float32") for s in shapes[: 2 + use_bias]]


def _flax(*stack):
    """``set_flax_variables``'s argument for per-layer Keras weight lists."""
    names = ("kernel", "recurrent_kernel", "bias")
    return {
        "params": {
            f"layer_{i}": dict(zip(names, weights, strict=False)) for i, weights in enumerate(stack)
        }
    }


def _assign(layer, weights):
    for variable, value in zip(layer.weights, weights, strict=True):
        variable.assign(value)


def _keras_lstm(weights, **kwargs):
    """A built keras.layers.LSTM holding ``weights``."""
    lstm = keras.layers.LSTM(UNITS, **kwargs)
    lstm.build((None, None, weights[0].shape[0]))
    _assign(lstm, weights)
    return lstm


def _wrap(make, merge_mode, swapped=False, **kwargs):
    """keras.layers.Bidirectional of ``make(go_backwards=..., **kwargs)``; ``swapped``:
    the forward layer goes backwards and the backward layer, given, forwards."""
    return keras.layers.Bidirectional(
        make(go_backwards=swapped, **kwargs),
        merge_mode=merge_mode,
        backward_layer=make(go_backwards=False, **kwargs) if swapped else None,
    )


def _keras_bidirectional(forward, backward, merge_mode, swapped=False, **kwargs):
    """A built keras.layers.Bidirectional(keras.layers.LSTM) holding the weights."""
    layer = _wrap(partial(keras.layers.LSTM, UNITS), merge_mode, swapped, **kwargs)
    layer.build((None, None, forward[0].shape[0]))
    _assign(layer.forward_layer, forward)
    _assign(layer.backward_layer, backward)
    return layer


def _banded_bidirectional(forward, backward, merge_mode, swapped=False, batch_shape=None, **kwargs):
    """A built keras.layers.Bidirectional(BandedLSTMLayer) holding the weights."""
    layer = _wrap(partial(BandedLSTMLayer, UNITS), merge_mode, swapped, **kwargs)
    layer.build(batch_shape or (None, None, None, forward[0].shape[0]))
    layer.forward_layer.set_flax_variables(_flax(forward))
    layer.backward_layer.set_flax_variables(_flax(backward))
    return layer


def _fold(x):
    """``[batch, bands, ...]`` as ``[batch * bands, ...]``: every band its own sequence."""
    return x.reshape(-1, *x.shape[2:])


def _masks(mode, x):
    """``(x, mask for our layer or None, [batch, bands, time] mask for Keras or None)``.

    Modes: ``none``; ``trailing`` (``[batch, time]`` right padding); ``holes``
    (``[batch, time]`` with masked steps first and in the middle); ``bands``
    (``[batch, bands, time]``, every band its own, one sequence all masked);
    ``masking`` (the steps where ``x`` holds ``MASK_VALUE``, for a Masking layer).
    """
    batch, bands, time = x.shape[:3]
    ones = np.ones((batch, bands, time), bool)
    if mode == "none":
        return x, None, None
    if mode in ("trailing", "holes"):
        mask = np.ones((batch, time), bool)
        if mode == "trailing":
            mask[1, time // 2 :] = False
        else:
            mask[0, [1, time - 2]] = False
            mask[1, [0, 3, 4]] = False
        return x, mask, ones & mask[:, None]
    mask = np.random.default_rng(time).random((batch, bands, time)) < 0.6
    mask[0, 0] = True
    mask[0, 0, 2] = mask[0, -1, -1] = mask[1, 0, 0] = False  # holes, last step, first step
    mask[-1, -1] = False  # a sequence with every step masked
    if mode == "bands":
        return x, mask, mask
    assert mode == "masking"
    x = np.where(mask[..., None], x, np.float32(MASK_VALUE))
    keras_mask = keras.layers.Masking(MASK_VALUE).compute_mask(_fold(x))
    return x, None, _np(keras_mask).reshape(batch, bands, time)


def _run_banded(layer, x, mode, mask, **kwargs):
    """The layer's call: with a Masking layer in front for mode ``masking``."""
    if mode != "masking":
        return layer(x, mask=mask, **kwargs)
    assert not kwargs, "no initial_state with a Masking layer"
    inputs = keras.Input(x.shape[1:])
    outputs = layer(keras.layers.Masking(MASK_VALUE)(inputs))
    return keras.Model(inputs, outputs)(x)


def _random_state(seed, num_layers, bands=BANDS):
    rng = np.random.default_rng(seed)
    return tuple(
        LSTMState(*(rng.standard_normal((BATCH, bands, UNITS)).astype("float32") for _ in "hc"))
        for _ in range(num_layers)
    )


def _close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(_np(actual), _np(expected), atol=atol, rtol=1e-5)


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


# -- 1. keras.layers.LSTM parity ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    mask: str = "none"
    activation: str = "default"
    use_bias: bool = True
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    return_sequences: bool = True
    return_state: bool = False
    num_layers: int = 1
    initial_state: bool = False

    def __str__(self):
        defaults = Case.__dataclass_fields__
        return "-".join(
            f"{f}={getattr(self, f)}"
            for f in defaults
            if getattr(self, f) != defaults[f].default or f == "mask"
        )


# A pairwise covering set of mask x activation x use_bias x go_backwards x
# zero_output_for_mask x return_sequences x return_state, then stacks and initial states.
LSTM_CASES = [
    Case("none", "default", True, False, False, True, False),
    Case("none", "relu", False, True, True, False, False),
    Case("none", "custom", True, False, True, True, True),
    Case("trailing", "default", True, False, False, True, False),
    Case("trailing", "relu", True, True, True, False, True),
    Case("trailing", "custom", False, False, True, True, True),
    Case("holes", "default", False, True, True, False, True),
    Case("holes", "relu", False, False, False, False, False),
    Case("holes", "custom", True, True, False, True, False),
    Case("bands", "default", True, True, True, False, True),
    Case("bands", "relu", False, False, False, True, True),
    Case("bands", "custom", True, True, False, False, False),
    Case("masking", "default", True, False, True, False, False),
    Case("masking", "relu", False, False, False, True, False),
    Case("masking", "custom", False, True, True, False, True),
    # go_backwards with zero outputs (or not), sequences and states, and masks per band.
    Case("bands", "default", True, True, True, True, True),
    Case("masking", "default", True, True, False, True, True),
    # Initial states: a masked first step outputs the initial hidden state.
    Case("holes", "default", True, False, False, True, True, initial_state=True),
    Case("bands", "relu", False, True, True, False, True, initial_state=True),
    Case("none", "custom", True, True, False, False, True, initial_state=True),
    # Stacks of two layers: against two stacked keras LSTMs, or going backwards
    # against one keras RNN of stacked LSTM cells (every layer runs backwards).
    Case("bands", "default", True, False, False, True, True, num_layers=2),
    Case("none", "relu", True, True, False, True, True, num_layers=2),
    Case("holes", "default", False, True, True, False, True, num_layers=2, initial_state=True),
    Case("masking", "custom", True, False, True, False, True, num_layers=2),
]


@pytest.mark.parametrize("case", LSTM_CASES, ids=str)
def test_every_band_matches_keras_lstm(case):
    x = random_inputs(LSTM_CASES.index(case), (BATCH, BANDS, TIME, FEATURES))
    x, mask, band_masks = _masks(case.mask, x)
    options = dict(
        ACTIVATIONS[case.activation],
        use_bias=case.use_bias,
        go_backwards=case.go_backwards,
        zero_output_for_mask=case.zero_output_for_mask,
    )
    stack = [
        _random_weights(FEATURES if i == 0 else UNITS, use_bias=case.use_bias, seed=10 + i)
        for i in range(case.num_layers)
    ]
    layer = BandedLSTMLayer(
        UNITS,
        case.num_layers,
        return_sequences=case.return_sequences,
        return_state=case.return_state,
        **options,
    )
    layer.set_flax_variables(_flax(*stack))
    state = _random_state(1, case.num_layers) if case.initial_state else None
    kwargs = {"initial_state": state} if state is not None else {}
    result = _run_banded(layer, x, case.mask, mask, **kwargs)
    outputs, final = result if case.return_state else (result, None)
    assert _shapes(outputs) == (BATCH, BANDS) + (TIME,) * case.return_sequences + (UNITS,)

    if case.go_backwards and case.num_layers > 1:
        _check_stacked_cells(case, options, stack, x, band_masks, state, outputs, final)
        return
    # The Keras stack: every layer but the last returns sequences; each gets the
    # mask, as Keras's own mask propagation (RNN.compute_mask) passes it on.
    lstms = [
        _keras_lstm(
            weights,
            return_sequences=case.return_sequences or i < case.num_layers - 1,
            return_state=True,
            **options,
        )
        for i, weights in enumerate(stack)
    ]
    for band in range(BANDS):
        sequence = x[:, band]
        band_mask = None if band_masks is None else band_masks[:, band]
        for i, lstm in enumerate(lstms):
            start = None if state is None else [state[i].hidden[:, band], state[i].cell[:, band]]
            sequence, hidden, cell = lstm(sequence, mask=band_mask, initial_state=start)
            if final is not None:
                _close(final[i].hidden[:, band], hidden)
                _close(final[i].cell[:, band], cell)
        _close(outputs[:, band], sequence)


def _check_stacked_cells(case, options, stack, x, band_masks, state, outputs, final):
    """A backwards stack against keras.layers.RNN(StackedRNNCells(...),
    go_backwards=True): separately stacked go_backwards LSTMs would alternate
    directions, each reversing the last one's reversed outputs."""
    cell_keys = ("activation", "recurrent_activation", "use_bias")
    cell_options = {k: v for k, v in options.items() if k in cell_keys}
    cells = [keras.layers.LSTMCell(UNITS, **cell_options) for _ in stack]
    rnn = keras.layers.RNN(
        keras.layers.StackedRNNCells(cells),
        return_sequences=case.return_sequences,
        return_state=True,
        go_backwards=True,
        zero_output_for_mask=case.zero_output_for_mask,
    )
    rnn.build((None, None, FEATURES))
    _assign(rnn, [w for weights in stack for w in weights])
    for band in range(BANDS):
        band_mask = None if band_masks is None else band_masks[:, band]
        start = None
        if state is not None:
            start = [[s.hidden[:, band], s.cell[:, band]] for s in state]
        expected, *states = rnn(x[:, band], mask=band_mask, initial_state=start)
        _close(outputs[:, band], expected)
        for i, (hidden, cell) in enumerate(states):
            _close(final[i].hidden[:, band], hidden)
            _close(final[i].cell[:, band], cell)


def test_weights_assigned_through_layer_weights_match_keras():
    """The layer's own variables take keras_lstm.get_weights()'s order and layout."""
    x = random_inputs(2, (BATCH, 3, TIME, FEATURES))
    weights = _random_weights(FEATURES, seed=3)
    layer = BandedLSTMLayer(UNITS, return_sequences=False, return_state=True)
    layer.build((None, None, None, FEATURES))
    assert [v.path.split("/", 1)[1] for v in layer.weights] == [
        "layer_0/kernel",
        "layer_0/recurrent_kernel",
        "layer_0/bias",
    ]
    _assign(layer, weights)
    y, (state,) = layer(x)
    lstm = _keras_lstm(weights, return_state=True)
    for band in range(3):
        expected, hidden, cell = lstm(x[:, band])
        _close(y[:, band], expected)
        _close(state.hidden[:, band], hidden)
        _close(state.cell[:, band], cell)


# -- 2. regularizers ------------------------------------------------------------------------


def _weight_regularizers():
    return dict(
        kernel_regularizer=keras.regularizers.L2(0.01),
        recurrent_regularizer=keras.regularizers.L1(0.02),
        bias_regularizer=keras.regularizers.L1L2(0.03, 0.04),
    )


def _loss_sum(layer):
    return float(sum(_np(loss) for loss in layer.losses))


def test_weight_regularizer_losses_equal_keras_stack():
    stack = [_random_weights(FEATURES, seed=20), _random_weights(UNITS, seed=21)]
    layer = BandedLSTMLayer(UNITS, 2, **_weight_regularizers())
    layer.set_flax_variables(_flax(*stack))
    lstms = [_keras_lstm(weights, **_weight_regularizers()) for weights in stack]
    assert len(layer.losses) == sum(len(lstm.losses) for lstm in lstms) == 6
    expected = sum(_loss_sum(lstm) for lstm in lstms)
    assert expected > 0.1
    np.testing.assert_allclose(_loss_sum(layer), expected, rtol=1e-5)


@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("regularizer", ["l2", "l1"])
def test_activity_regularizer_loss_equals_keras(regularizer, return_state):
    """Keras adds the activity regularizer of every output (states too) divided by
    the batch size; over the bands, that is the sum of the per-band Keras losses."""
    x = random_inputs(22, (BATCH, 3, TIME, FEATURES))
    weights = _random_weights(FEATURES, seed=23)
    activity = {"l2": keras.regularizers.L2(0.05), "l1": keras.regularizers.L1(0.03)}[regularizer]
    options = dict(_weight_regularizers(), activity_regularizer=activity, return_state=return_state)
    layer = BandedLSTMLayer(UNITS, return_sequences=False, **options)
    layer.set_flax_variables(_flax(weights))
    weight_losses = _loss_sum(layer)
    layer(x)
    lstm = _keras_lstm(weights, **options)
    keras_weight_losses = _loss_sum(lstm)
    np.testing.assert_allclose(weight_losses, keras_weight_losses, rtol=1e-5)
    expected = 0.0
    for band in range(3):
        lstm(x[:, band])
        expected += _loss_sum(lstm) - keras_weight_losses
    assert len(layer.losses) == 3 + 1 + 2 * return_state
    assert expected > 0.01
    np.testing.assert_allclose(_loss_sum(layer) - weight_losses, expected, rtol=1e-5)


# -- 3. constraints (and regularizers) in fit ------------------------------------------------


@pytest.mark.parametrize("kind", ["forwards", "go_backwards", "bidirectional"])
def test_one_fit_step_with_constraints_and_regularizers_equals_keras(kind):
    """One SGD step of a one-band model equals Keras's LSTM (or Bidirectional(LSTM))
    model trained on the same data from the same weights; the constraints hold and
    did something."""
    time, width = 5, 2 * UNITS if kind == "bidirectional" else UNITS
    x = random_inputs(30, (BATCH, 1, time, FEATURES))
    y = random_inputs(31, (BATCH, 1, time, width))
    weights = [_random_weights(FEATURES, seed=32), _random_weights(FEATURES, seed=33)]
    options = dict(
        _weight_regularizers(),
        activity_regularizer=keras.regularizers.L2(0.01),
        kernel_constraint=keras.constraints.MaxNorm(0.5),
        recurrent_constraint=keras.constraints.NonNeg(),
        bias_constraint=keras.constraints.MaxNorm(0.3, axis=0),
    )
    if kind == "bidirectional":
        layer = _banded_bidirectional(*weights, "concat", **options)
        lstm = _keras_bidirectional(*weights, "concat", return_sequences=True, **options)
        pairs = [
            (layer.forward_layer, lstm.forward_layer),
            (layer.backward_layer, lstm.backward_layer),
        ]
    else:
        options["go_backwards"] = kind == "go_backwards"
        layer = BandedLSTMLayer(UNITS, **options)
        layer.set_flax_variables(_flax(weights[0]))
        lstm = _keras_lstm(weights[0], return_sequences=True, **options)
        pairs = [(layer, lstm)]
        weights = weights[:1]
    inputs, keras_inputs = keras.Input((1, None, FEATURES)), keras.Input((None, FEATURES))
    ours, theirs = keras.Model(inputs, layer(inputs)), keras.Model(keras_inputs, lstm(keras_inputs))
    for model, data in ((ours, (x, y)), (theirs, (x[:, 0], y[:, 0]))):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.fit(*data, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    for (banded, keras_lstm), before in zip(pairs, weights, strict=True):
        kernel, recurrent, bias = (_np(v.value) for v in banded.weights)
        assert np.linalg.norm(kernel, axis=0).max() <= 0.5 + 1e-5
        assert recurrent.min() >= 0 and (recurrent == 0).any()
        assert np.linalg.norm(bias) <= 0.3 + 1e-5
        for ours_variable, keras_variable, initial in zip(
            banded.weights, keras_lstm.weights, before, strict=True
        ):
            assert np.abs(_np(ours_variable.value) - initial).max() > 1e-3
            _close(ours_variable.value, keras_variable.value)


# -- 4. configuration and saving ----------------------------------------------------------


def _every_option():
    """Every argument away from its default."""
    return dict(
        units=UNITS,
        num_layers=2,
        activation="relu",
        recurrent_activation="hard_sigmoid",
        use_bias=False,
        kernel_initializer=keras.initializers.GlorotNormal(seed=1),
        recurrent_initializer=keras.initializers.Orthogonal(gain=0.5, seed=2),
        bias_initializer="ones",
        unit_forget_bias=False,
        kernel_regularizer=keras.regularizers.L2(0.01),
        recurrent_regularizer=keras.regularizers.L1(0.02),
        bias_regularizer=keras.regularizers.L1L2(0.01, 0.02),
        activity_regularizer=keras.regularizers.L2(0.03),
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        recurrent_constraint=keras.constraints.NonNeg(),
        bias_constraint=keras.constraints.UnitNorm(),
        dropout=0.25,
        recurrent_dropout=0.125,
        seed=7,
        return_sequences=False,
        return_state=True,
        go_backwards=True,
        stateful=True,
        unroll=True,
        use_cudnn=False,
        zero_output_for_mask=True,
        remat_chunk=2,
        name="every_option",
    )


def _flat(result):
    outputs, state = result
    return [outputs, *(a for layer_state in state for a in layer_state)]


def test_config_keeps_every_argument():
    options = _every_option()
    layer = BandedLSTMLayer(**options)
    config = layer.get_config()
    serialized = {
        "initializer": keras.initializers.serialize,
        "regularizer": keras.regularizers.serialize,
        "constraint": keras.constraints.serialize,
    }
    for key, value in options.items():
        kind = key.rsplit("_", 1)[-1]
        if kind in serialized:
            value = serialized[kind](getattr(keras, f"{kind}s").get(value))
        assert config[key] == value, key

    clone = BandedLSTMLayer.from_config(config)
    assert clone.get_config() == config
    for name in ("activation", "recurrent_activation"):
        assert getattr(clone, name) is getattr(keras.activations, options[name])
    assert clone.unroll is True and clone.use_cudnn is False
    assert BandedLSTMLayer(UNITS).get_config()["unroll"] is False  # Keras's default, as given
    with pytest.raises(AttributeError, match=r"activation: read-only, it is layer.module"):
        clone.activation = keras.activations.relu
    assert clone.activity_regularizer.get_config() == options["activity_regularizer"].get_config()


@_SAVING_WARNING
def test_keras_file_round_trip_with_every_argument_set(tmp_path):
    x = random_inputs(40, (BATCH, 3, TIME, FEATURES))
    x[0, 1, 0] = x[1, 2, 3:] = MASK_VALUE  # the last step run (time 0, backwards) masked
    inputs = keras.Input(batch_shape=(BATCH, 3, None, FEATURES))
    layer = BandedLSTMLayer(**_every_option())
    model = keras.Model(inputs, _flat(layer(keras.layers.Masking(MASK_VALUE)(inputs))))
    model(x[:, :, :3])  # leaves a stored state that is not zeros
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (loaded_layer,) = [lay for lay in loaded.layers if isinstance(lay, BandedLSTMLayer)]
    assert loaded_layer.get_config() == layer.get_config()
    jax.tree.map(np.testing.assert_array_equal, loaded_layer.get_state(), layer.get_state())
    assert np.abs(_np(layer.get_state()[1].cell)).max() > 0.01

    expected, got = model(x), loaded(x)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert not _np(expected[0])[0, 1].any()  # zero_output_for_mask: zeros
    np.testing.assert_allclose(_loss_sum(loaded), _loss_sum(model), rtol=1e-6)
    assert len(loaded.losses) == len(model.losses) == 2 * 2 + 1 + 4  # weights, outputs, states


def _without_build_config(config):
    """A config less its build configs (whose input shapes load as lists, not tuples)."""
    if not isinstance(config, dict):
        return config
    return {k: _without_build_config(v) for k, v in config.items() if k != "build_config"}


@_SAVING_WARNING
def test_bidirectional_keras_file_round_trip(tmp_path):
    x = random_inputs(41, (BATCH, 3, TIME, FEATURES))
    inputs = keras.Input((3, None, FEATURES))
    banded = BandedLSTMLayer(UNITS, 2, activation="relu", use_bias=False, return_state=True)
    bidirectional = keras.layers.Bidirectional(banded, merge_mode="mul")
    outputs, forward, backward = bidirectional(keras.layers.Masking(MASK_VALUE)(inputs))
    model = keras.Model(inputs, [outputs, *forward[1], *backward[0]])
    path = tmp_path / "bidirectional.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (loaded_layer,) = [lay for lay in loaded.layers if isinstance(lay, keras.layers.Bidirectional)]
    assert type(loaded_layer.forward_layer) is type(loaded_layer.backward_layer) is BandedLSTMLayer
    assert _without_build_config(loaded_layer.get_config()) == _without_build_config(
        bidirectional.get_config()
    )
    assert loaded_layer.backward_layer.go_backwards and not loaded_layer.forward_layer.go_backwards
    x[1, :, 2] = MASK_VALUE
    for a, b in zip(loaded(x), model(x), strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))


# -- 5. keras.layers.Bidirectional(BandedLSTMLayer) against Bidirectional(LSTM) ------------


@dataclasses.dataclass(frozen=True)
class BiCase:
    merge_mode: str | None = "concat"
    mask: str = "none"
    return_sequences: bool = True
    return_state: bool = False
    initial_state: bool | str = False  # "flat": Keras's [h_f, c_f, h_b, c_b]
    swapped: bool = False  # a forward layer that goes backwards, a backward one forwards

    def __str__(self):
        return "-".join(f"{f}={getattr(self, f)}" for f in BiCase.__dataclass_fields__)


BIDIRECTIONAL_CASES = [
    BiCase("concat", "bands", True, False, False),
    BiCase("concat", "masking", False, True, False),
    BiCase("sum", "holes", True, True, True),
    BiCase("sum", "none", False, False, False),
    BiCase("mul", "bands", False, False, False),
    BiCase("mul", "trailing", True, True, False),
    BiCase("ave", "none", False, True, "flat"),
    BiCase("ave", "masking", True, False, False),
    BiCase(None, "bands", True, True, False),
    BiCase(None, "holes", False, False, True),
    # Keras lets the forward layer go backwards when the backward layer is given.
    BiCase("concat", "none", True, False, False, swapped=True),
    BiCase(None, "holes", True, True, "flat", swapped=True),
    BiCase("sum", "bands", False, True, False, swapped=True),
]


@pytest.mark.parametrize("case", BIDIRECTIONAL_CASES, ids=str)
def test_bidirectional_matches_keras_bidirectional_lstm(case):
    x = random_inputs(50, (BATCH, BANDS, TIME, FEATURES))
    x, mask, band_masks = _masks(case.mask, x)
    forward, backward = _random_weights(FEATURES, seed=51), _random_weights(FEATURES, seed=52)
    options = dict(
        merge_mode=case.merge_mode,
        swapped=case.swapped,
        return_sequences=case.return_sequences,
        return_state=case.return_state,
    )
    layer = _banded_bidirectional(forward, backward, **options)
    states = (_random_state(53, 1), _random_state(54, 1)) if case.initial_state else None
    kwargs = {}
    if case.initial_state == "flat":
        kwargs["initial_state"] = [a for direction in states for a in direction[0]]
    elif case.initial_state:
        kwargs["initial_state"] = list(states)
    result = _run_banded(layer, x, case.mask, mask, **kwargs)
    result = _flat_bidirectional(result, case.merge_mode, case.return_state)

    keras_layer = _keras_bidirectional(forward, backward, **options)
    for band in range(BANDS):
        band_mask = None if band_masks is None else band_masks[:, band]
        start = None
        if case.initial_state:
            start = [a[:, band] for direction in states for a in direction[0]]
        expected = keras_layer(x[:, band], mask=band_mask, initial_state=start)
        expected = expected if case.return_state or case.merge_mode is None else [expected]
        assert len(result) == len(expected)
        for ours, theirs in zip(result, expected, strict=True):
            _close(ours[:, band], theirs)


def _flat_bidirectional(result, merge_mode, return_state):
    """The call's outputs as Keras's Bidirectional(LSTM) lists them: the outputs
    (two with merge_mode=None), then forward h, c and backward h, c."""
    outputs = 2 if merge_mode is None else 1
    if not return_state:
        return list(result) if merge_mode is None else [result]
    assert len(result) == outputs + 2
    forward_state, backward_state = result[outputs:]
    assert len(forward_state) == len(backward_state) == 1
    return [*result[:outputs], *forward_state[0], *backward_state[0]]


@pytest.mark.parametrize("merge_mode", ["concat", None])
def test_stateful_bidirectional_matches_keras_across_calls_and_resets(merge_mode):
    """Two calls continue each direction's state as Keras's stateful Bidirectional
    does (one Keras sequence per band); after a reset both start from zeros again.
    No return_state: Keras 3.15's Bidirectional.compute_mask fails for stateful
    layers that return their state, keras.layers.LSTM included."""
    x = random_inputs(60, (BATCH, BANDS, 2 * TIME, FEATURES))
    first, second = x[:, :, :TIME], x[:, :, TIME:]
    forward, backward = _random_weights(FEATURES, seed=61), _random_weights(FEATURES, seed=62)
    options = dict(merge_mode=merge_mode, stateful=True)
    inputs = keras.Input(batch_shape=(BATCH, BANDS, None, FEATURES))
    layer = _banded_bidirectional(forward, backward, batch_shape=inputs.shape, **options)
    model = keras.Model(inputs, layer(inputs))
    keras_layer = _wrap(partial(keras.layers.LSTM, UNITS, return_sequences=True), **options)
    keras_layer.build((BATCH * BANDS, None, FEATURES))
    _assign(keras_layer.forward_layer, forward)
    _assign(keras_layer.backward_layer, backward)

    def check(result, expected):
        result = list(result) if merge_mode is None else [result]
        expected = list(expected) if merge_mode is None else [expected]
        for ours, theirs in zip(result, expected, strict=True):
            _close(_fold(_np(ours)), theirs)
        for ours, theirs in zip(
            (layer.forward_layer, layer.backward_layer),
            (keras_layer.forward_layer, keras_layer.backward_layer),
            strict=True,
        ):
            (state,) = ours.get_state()
            _close(_fold(_np(state.hidden)), theirs.states[0].value)
            _close(_fold(_np(state.cell)), theirs.states[1].value)

    check(layer(first), keras_layer(_fold(first)))
    check(model(second), keras_layer(_fold(second)))
    layer.reset_state()
    keras_layer.reset_state()
    check(layer(second), keras_layer(_fold(second)))
    both = {id(layer.forward_layer), id(layer.backward_layer)}
    assert {id(a) for a in interop.reset_states(model)} == both
    keras_layer.reset_state()
    check(model.predict(second, batch_size=BATCH, verbose=0), keras_layer(_fold(second)))


@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_of_a_stack_matches_keras_stacked_cells(return_sequences):
    """keras.layers.Bidirectional(BandedLSTMLayer(units, 2)) equals Keras's own
    bidirectional two-layer LSTM, Bidirectional(RNN(StackedRNNCells)): the backward
    direction runs both layers from the last step to the first."""
    x = random_inputs(76, (BATCH, BANDS, TIME, FEATURES))
    x, mask, band_masks = _masks("holes", x)
    stacks = [
        [_random_weights(FEATURES, seed=seed), _random_weights(UNITS, seed=seed + 1)]
        for seed in (77, 79)
    ]
    layer = keras.layers.Bidirectional(
        BandedLSTMLayer(UNITS, 2, return_sequences=return_sequences), merge_mode=None
    )
    layer.build((None, None, None, FEATURES))
    layer.forward_layer.set_flax_variables(_flax(*stacks[0]))
    layer.backward_layer.set_flax_variables(_flax(*stacks[1]))
    y, y_backward = layer(x, mask=mask)

    cells = keras.layers.StackedRNNCells([keras.layers.LSTMCell(UNITS) for _ in range(2)])
    keras_layer = keras.layers.Bidirectional(
        keras.layers.RNN(cells, return_sequences=return_sequences), merge_mode=None
    )
    keras_layer.build((None, None, FEATURES))
    _assign(keras_layer.forward_layer, [w for weights in stacks[0] for w in weights])
    _assign(keras_layer.backward_layer, [w for weights in stacks[1] for w in weights])
    for band in range(BANDS):
        expected, expected_backward = keras_layer(x[:, band], mask=band_masks[:, band])
        _close(y[:, band], expected)
        _close(y_backward[:, band], expected_backward)


# -- 6. keras.layers.Bidirectional in compiled predict; its backward layer alone -----------


@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_in_compiled_predict_matches_keras(return_sequences):
    """In Keras's compiled predict loop too (the backward layer's outputs are
    handed to Keras's reversal inside a jitted function)."""
    x = random_inputs(70, (BATCH, BANDS, TIME, FEATURES))
    x, _, band_masks = _masks("masking", x)
    forward, backward = _random_weights(FEATURES, seed=71), _random_weights(FEATURES, seed=72)
    options = dict(merge_mode="concat", return_sequences=return_sequences)
    layer = _banded_bidirectional(forward, backward, **options)
    inputs = keras.Input((BANDS, None, FEATURES))
    model = keras.Model(inputs, layer(keras.layers.Masking(MASK_VALUE)(inputs)))
    y = model.predict(x, verbose=0)
    keras_layer = _keras_bidirectional(forward, backward, **options)
    for band in range(BANDS):
        _close(y[:, band], keras_layer(x[:, band], mask=band_masks[:, band]))


def test_backward_layer_called_alone_returns_keras_order():
    """Outside keras.layers.Bidirectional, the wrapped backward layer is a plain
    go_backwards layer: outputs in the order the steps ran, as Keras's."""
    x = random_inputs(73, (BATCH, BANDS, TIME, FEATURES))
    forward, backward = _random_weights(FEATURES, seed=74), _random_weights(FEATURES, seed=75)
    layer = _banded_bidirectional(forward, backward, "concat", return_sequences=True)
    keras_layer = _keras_bidirectional(forward, backward, "concat", return_sequences=True)
    y = layer.backward_layer(x)
    for band in range(BANDS):
        _close(y[:, band], keras_layer.backward_layer(x[:, band]))


# -- 7. symbolic shapes -----------------------------------------------------------------------


def _check_symbolic_matches_eager(layer, x):
    """A functional model's symbolic outputs have the eager call's structure and
    shapes (batch and time unknown), and the model runs to those shapes."""
    inputs = keras.Input((x.shape[1], None, x.shape[3]))
    symbolic = layer(inputs)
    eager = layer(x)
    assert jax.tree.structure(symbolic) == jax.tree.structure(eager)
    eager_shapes = _shapes(eager)
    unknown = jax.tree.map(
        lambda s: (None, s[1], None, s[3]) if len(s) == 4 else (None, *s[1:]),
        eager_shapes,
        is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s),
    )
    assert _shapes(symbolic) == unknown
    assert _shapes(keras.Model(inputs, symbolic)(x)) == eager_shapes
    spec = layer.compute_output_spec(keras.KerasTensor(x.shape))
    assert _shapes(spec) == eager_shapes


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_banded_layer_symbolic_shapes_match_eager(return_sequences, return_state, go_backwards):
    x = random_inputs(80, (BATCH, 3, 5, FEATURES))
    options = dict(
        return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards
    )
    layer = BandedLSTMLayer(UNITS, 2, **options)
    _check_symbolic_matches_eager(layer, x)
    shape = layer.compute_output_shape(x.shape)
    structure = jax.tree.structure(layer(x))
    flat_shapes = jax.tree.leaves(
        shape, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)
    )
    assert jax.tree.unflatten(structure, flat_shapes) == _shapes(layer(x))


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
def test_bidirectional_symbolic_shapes_match_eager(merge_mode):
    x = random_inputs(81, (BATCH, 3, 5, FEATURES))
    for return_sequences in (False, True):
        for return_state in (False, True):
            for go_backwards in (False, True):
                options = dict(return_sequences=return_sequences, return_state=return_state)
                # A forward layer that goes backwards needs its backward layer given.
                backward = BandedLSTMLayer(UNITS, **options) if go_backwards else None
                layer = keras.layers.Bidirectional(
                    BandedLSTMLayer(UNITS, go_backwards=go_backwards, **options),
                    merge_mode=merge_mode,
                    backward_layer=backward,
                )
                _check_symbolic_matches_eager(layer, x)
