"""BandedLSTMLayer against the float64 reference, a real keras.layers.LSTM, and itself
across Keras's compiled predict, evaluate and fit loops."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import interop
from banded_rnn import BandedLSTM, LSTMState
from interop import BandedLSTMLayer

from helpers import bad_inputs, init_model, random_inputs, run_script, script_env
from reference import lstm_reference, params_from_variables

ATOL = 1e-5
SCRIPTS = Path(__file__).parent / "scripts"


def _built_layer(x, units=3, num_layers=1, seed=0, **kwargs):
    """A layer built for ``x`` with random weights and biases, and those weights."""
    layer = BandedLSTMLayer(units, num_layers=num_layers, **kwargs)
    variables = init_model(BandedLSTM(units, num_layers=num_layers), x, seed=seed)
    layer.build(x.shape if kwargs.get("stateful") else (None, None, None, x.shape[-1]))
    layer.set_flax_variables(variables)
    return layer, params_from_variables(variables)


def _stateful_model(batch, bands, features, units=3, num_layers=1, seed=0):
    x = random_inputs(seed, (batch, bands, 8, features))
    layer, params = _built_layer(x, units, num_layers, seed, stateful=True)
    inputs = keras.Input(batch_shape=(batch, bands, None, features))
    return keras.Model(inputs, layer(inputs)), layer, params


def _state_arrays(state):
    return [(np.asarray(s.hidden), np.asarray(s.cell)) for s in state]


def _assert_state_close(state, reference_state, atol=ATOL):
    for (h, c), (h_ref, c_ref) in zip(_state_arrays(state), reference_state, strict=True):
        np.testing.assert_allclose(h, h_ref, atol=atol)
        np.testing.assert_allclose(c, c_ref, atol=atol)


# -- the user's experiment -------------------------------------------------------


def _whole_vs_halves(model, reset, x):
    reset()
    whole = model.predict(x, verbose=0)
    reset()
    first = model.predict(x[:, :, :25], verbose=0)
    second = model.predict(x[:, :, 25:], verbose=0)
    return whole, np.concatenate([first, second], axis=2)


def test_user_experiment_halves_equal_whole_unlike_shared_keras_lstm():
    x = random_inputs(0, (1, 3, 50, 4))
    inputs = keras.Input(batch_shape=(1, 3, None, 4))

    shared = keras.layers.LSTM(
        3,
        stateful=True,
        return_sequences=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        recurrent_initializer=keras.initializers.Orthogonal(seed=2),
    )
    stacked = keras.ops.stack([shared(inputs[:, band]) for band in range(3)], axis=1)
    shared_model = keras.Model(inputs, stacked)
    whole, halves = _whole_vs_halves(shared_model, shared.reset_state, x)
    assert np.abs(whole - halves).sum() > 0.1  # the bug: bands share one state

    layer = BandedLSTMLayer(3, stateful=True)
    model = keras.Model(inputs, layer(inputs))
    layer.set_flax_variables(interop.from_keras_lstm(shared))
    whole, halves = _whole_vs_halves(model, lambda: interop.reset_states(model), x)
    assert np.abs(whole - halves).max() <= 1e-6
    _, expected = lstm_reference(params_from_variables(layer.get_flax_variables()), x)
    np.testing.assert_allclose(whole, expected, atol=ATOL)


# -- parity ------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_call_matches_reference_and_core(num_layers, return_sequences):
    x = random_inputs(1, (2, 3, 7, 4))
    layer, params = _built_layer(x, 5, num_layers, return_sequences=return_sequences)
    y = np.asarray(layer(x))
    state, outputs = lstm_reference(params, x)
    expected = outputs if return_sequences else state[-1][0]
    np.testing.assert_allclose(y, expected, atol=ATOL)
    _, core = layer.module.apply(layer.get_flax_variables(), None, x)
    np.testing.assert_allclose(y, core if return_sequences else core[:, :, -1], atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_return_state_feeds_initial_state(num_layers):
    x = random_inputs(2, (2, 3, 9, 4))
    layer, params = _built_layer(x, 4, num_layers, return_state=True)
    first, state = layer(x[:, :, :4])
    assert isinstance(state, tuple) and len(state) == num_layers
    assert all(isinstance(s, LSTMState) for s in state)
    second, final = layer(x[:, :, 4:], initial_state=state)
    reference_state, expected = lstm_reference(params, x)
    np.testing.assert_allclose(np.concatenate([first, second], axis=2), expected, atol=ATOL)
    _assert_state_close(final, reference_state)

    # The same threading inside a Functional model.
    head = keras.Input((3, None, 4))
    tail = keras.Input((3, None, 4))
    y_head, head_state = layer(head)
    y_tail, _ = layer(tail, initial_state=head_state)
    model = keras.Model([head, tail], keras.ops.concatenate([y_head, y_tail], axis=2))
    y = model.predict([x[:, :, :4], x[:, :, 4:]], verbose=0)
    np.testing.assert_allclose(y, expected, atol=ATOL)


def test_initial_state_given_to_stateful_layer_replaces_the_stored_one():
    x = random_inputs(3, (1, 2, 6, 3))
    layer, params = _built_layer(x, 4, 1, stateful=True)
    layer(x)  # stores a non-zero state
    rng = np.random.default_rng(3)
    start = (LSTMState(*(rng.standard_normal((1, 2, 4)).astype("float32") for _ in "hc")),)
    y = layer(x, initial_state=start)
    reference_state, expected = lstm_reference(params, x, state=start)
    np.testing.assert_allclose(y, expected, atol=ATOL)
    _assert_state_close(layer.get_state(), reference_state)


# -- state across Keras's compiled loops -------------------------------------------------


def test_stateful_state_persists_across_compiled_evaluate_and_predict():
    model, layer, params = _stateful_model(1, 3, 4, units=3, num_layers=2)
    model.compile(loss="mse")
    x = random_inputs(4, (1, 3, 20, 4))
    reference_half, _ = lstm_reference(params, x[:, :, :12])
    reference_whole, expected = lstm_reference(params, x)

    interop.reset_states(model)
    model.evaluate(x[:, :, :12], np.zeros((1, 3, 12, 3), "float32"), verbose=0)
    _assert_state_close(layer.get_state(), reference_half)
    y = model.predict(x[:, :, 12:], verbose=0)
    np.testing.assert_allclose(y, expected[:, :, 12:], atol=ATOL)
    _assert_state_close(layer.get_state(), reference_whole)


def test_stateful_fit_carries_state_across_batches():
    """Batch k of a stateful fit continues the sequences of batch k - 1; the
    weights and state after fit equal a manual SGD run over the same chunks."""
    bands, features, units, chunk, chunks = 2, 3, 4, 5, 3
    model, layer, _ = _stateful_model(1, bands, features, units=units, seed=5)
    learning_rate = 0.1
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    x = random_inputs(6, (1, bands, chunk * chunks, features))
    y = random_inputs(7, (1, bands, chunk * chunks, units))
    split = lambda a: np.concatenate(np.split(a, chunks, axis=2))  # noqa: E731
    variables = layer.get_flax_variables()

    interop.reset_states(model)
    model.fit(split(x), split(y), batch_size=1, epochs=1, shuffle=False, verbose=0)

    module = BandedLSTM(units)

    def loss(variables, state, x_chunk, y_chunk):
        state, outputs = module.apply(variables, state, x_chunk)
        return jnp.mean((outputs - y_chunk) ** 2), state

    state = None
    gradient = jax.jit(jax.grad(loss, has_aux=True))  # one program per state structure
    for k in range(chunks):
        part = slice(k * chunk, (k + 1) * chunk)
        grads, state = gradient(variables, state, x[:, :, part], y[:, :, part])
        variables = jax.tree.map(lambda p, g: p - learning_rate * g, variables, grads)

    chex = jax.tree.map(np.asarray, (variables, _state_arrays(state)))
    got = jax.tree.map(np.asarray, (layer.get_flax_variables(), _state_arrays(layer.get_state())))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), got, chex)
    assert np.abs(chex[1][0][0]).max() > 0.01  # a real state, not zeros


def test_reset_state_of_some_sequences_and_of_nested_models():
    model, layer, params = _stateful_model(3, 2, 4)
    x = random_inputs(8, (3, 2, 6, 4))
    model.predict(x, batch_size=3, verbose=0)
    (before,) = _state_arrays(layer.get_state())
    layer.reset_state(batch=[1])
    (after,) = _state_arrays(layer.get_state())
    for b in (0, 2):
        np.testing.assert_array_equal(after[0][b], before[0][b])
        np.testing.assert_array_equal(after[1][b], before[1][b])
    assert not after[0][1].any() and not after[1][1].any()
    assert np.abs(before[0][1]).max() > 0.01

    # reset_states finds the layer inside a model nested in another model.
    outer_inputs = keras.Input(batch_shape=(3, 2, None, 4))
    outer = keras.Model(outer_inputs, keras.layers.Dense(2)(model(outer_inputs)))
    assert interop.reset_states(outer) == [layer]
    assert not any(a.any() for pair in _state_arrays(layer.get_state()) for a in pair)


# -- masks and dropout ----------------------------------------------------------------


def test_masking_layer_freezes_state_like_the_reference_and_keras_lstm():
    batch, bands, time, features, units = 2, 3, 8, 4, 5
    lengths = np.array([[8, 5, 0], [3, 6, 1]])
    x = random_inputs(9, (batch, bands, time, features))
    x = np.where(np.arange(time)[None, None, :, None] < lengths[..., None, None], x, 0.0)
    layer, params = _built_layer(x, units, 1, return_state=True)
    inputs = keras.Input((bands, None, features))
    outputs, state = layer(keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, [outputs, state[0].hidden, state[0].cell])
    y, hidden, cell = model.predict(x, verbose=0)

    reference_state, expected = lstm_reference(params, x, seq_lengths=lengths)
    valid = np.arange(time)[None, None, :] < lengths[..., None]
    np.testing.assert_allclose(y[valid], expected[valid], atol=ATOL)
    # Past each length, Keras's default (zero_output_for_mask=False) repeats
    # the last valid output: the final hidden state.
    np.testing.assert_allclose(y, np.where(valid[..., None], y, hidden[:, :, None, :]), atol=ATOL)
    _assert_state_close((LSTMState(hidden, cell),), reference_state)

    lstm = keras.layers.LSTM(units, return_sequences=True, return_state=True)
    lstm.build((None, None, features))
    lstm.set_weights(interop.to_keras_lstm(layer.get_flax_variables())[0])
    for band in range(bands):
        mask = np.arange(time)[None] < lengths[:, band, None]
        keras_y, keras_h, keras_c = (np.asarray(a) for a in lstm(x[:, band], mask=mask))
        np.testing.assert_allclose(keras_y, y[:, band], atol=ATOL)
        np.testing.assert_allclose(keras_h, hidden[:, band], atol=ATOL)
        np.testing.assert_allclose(keras_c, cell[:, band], atol=ATOL)


def test_mask_argument_skips_masked_steps_like_keras_lstm():
    x = random_inputs(10, (2, 3, 7, 4))
    layer, params = _built_layer(x, 4, 1, return_sequences=False)
    # Batch 0 is right-padded after 5 steps; batch 1 has a hole at step 2.
    mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1, 1]], bool)
    y = layer(x, mask=mask)
    state, _ = lstm_reference(params, x, mask=mask)
    np.testing.assert_allclose(y, state[-1][0], atol=ATOL)

    lstm = keras.layers.LSTM(4)
    lstm.build((None, None, 4))
    lstm.set_weights(interop.to_keras_lstm(layer.get_flax_variables())[0])
    for band in range(3):
        np.testing.assert_allclose(lstm(x[:, band], mask=mask), y[:, band], atol=ATOL)

    band_mask = np.random.default_rng(11).random((2, 3, 7)) < 0.6
    state, _ = lstm_reference(params, x, mask=band_mask)
    np.testing.assert_allclose(layer(x, mask=band_mask), state[-1][0], atol=ATOL)


def test_training_flag_drives_dropout_through_the_core():
    x = random_inputs(11, (2, 3, 6, 4))
    layer, params = _built_layer(x, 4, 2, dropout=0.3, recurrent_dropout=0.2, seed=1)
    _, expected = lstm_reference(params, x)
    np.testing.assert_allclose(layer(x, training=False), expected, atol=ATOL)

    key = jax.random.wrap_key_data(layer.seed_generator.state.value)
    y = np.asarray(layer(x, training=True))
    _, core = layer.module.apply(
        layer.get_flax_variables(), None, x, deterministic=False, rngs={"dropout": key}
    )
    np.testing.assert_allclose(y, core, atol=1e-6)
    assert np.abs(y - expected).max() > 1e-3
    assert np.abs(np.asarray(layer(x, training=True)) - y).max() > 1e-3  # fresh masks


# -- models, shapes, saving ---------------------------------------------------------------


def test_sequential_and_subclassed_models_with_variable_time():
    layer, params = _built_layer(random_inputs(0, (2, 3, 5, 4)), 5, 1)
    dense = keras.layers.Dense(2)
    sequential = keras.Sequential([keras.Input(batch_shape=(2, 3, None, 4)), layer, dense])

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.banded, self.dense = layer, dense

        def call(self, x):
            return self.dense(self.banded(x))

    subclassed = Model()
    for time in (7, 11):
        x = random_inputs(time, (2, 3, time, 4))
        _, outputs = lstm_reference(params, x)
        kernel, bias = (np.asarray(w.value, np.float64) for w in dense.weights)
        expected = outputs @ kernel + bias
        np.testing.assert_allclose(sequential.predict(x, verbose=0), expected, atol=ATOL)
        np.testing.assert_allclose(subclassed.predict(x, verbose=0), expected, atol=ATOL)


# Keras 3.15's Variable.__array__ lacks NumPy 2's `copy` keyword, and saving calls it.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_keras_file_round_trip_keeps_weights_and_state(tmp_path):
    inputs = keras.Input(batch_shape=(2, 3, None, 4))
    layer = BandedLSTMLayer(5, num_layers=2, stateful=True, dropout=0.1, seed=3, unroll=2)
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    x = random_inputs(12, (2, 3, 10, 4))
    model.predict(x[:, :, :6], verbose=0)  # leaves a non-zero state

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (loaded_layer,) = [lay for lay in loaded.layers if isinstance(lay, BandedLSTMLayer)]
    assert loaded_layer.get_config() == layer.get_config()
    for a, b in zip(
        _state_arrays(loaded_layer.get_state()), _state_arrays(layer.get_state()), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        loaded.predict(x[:, :, 6:], verbose=0), model.predict(x[:, :, 6:], verbose=0)
    )


def test_config_round_trip_and_summary():
    layer = BandedLSTMLayer(
        7,
        num_layers=3,
        stateful=True,
        return_sequences=False,
        return_state=True,
        dropout=0.25,
        recurrent_dropout=0.5,
        unit_forget_bias=False,
        unroll=4,
        remat_chunk=16,
        kernel_initializer=keras.initializers.GlorotNormal(seed=1),
        recurrent_initializer="identity",
        bias_initializer="ones",
        seed=9,
        name="bands",
    )
    config = layer.get_config()
    clone = BandedLSTMLayer.from_config(config)
    assert clone.get_config() == config
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(revived) is BandedLSTMLayer and revived.get_config() == config
    for key in (
        "units",
        "num_layers",
        "stateful",
        "return_sequences",
        "return_state",
        "dropout",
        "recurrent_dropout",
        "unit_forget_bias",
        "unroll",
        "remat_chunk",
        "seed",
    ):
        assert config[key] == getattr(layer, key)

    inputs = keras.Input(batch_shape=(1, 3, None, 4))
    model = keras.Model(inputs, BandedLSTMLayer(6, num_layers=2)(inputs))
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    assert "BandedLSTMLayer" in text and "(1, 3, None, 6)" in text
    trainable = 4 * 6 * (4 + 6 + 1) + 4 * 6 * (6 + 6 + 1)
    assert f"{trainable:,}" in text or str(trainable) in text
    paths = [v.path for v in model.weights]
    assert paths == [
        f"banded_lstm_layer{suffix}/layer_{i}/{name}"
        for suffix in [paths[0].split("/")[0][len("banded_lstm_layer") :]]
        for i in range(2)
        for name in ("kernel", "recurrent_kernel", "bias")
    ]


def test_shared_config_lives_in_the_module_only():
    layer = BandedLSTMLayer(
        6, num_layers=2, dropout=0.1, recurrent_dropout=0.2, unit_forget_bias=False, unroll=3
    )
    assert layer.module == BandedLSTM(
        6,
        num_layers=2,
        dropout=0.1,
        recurrent_dropout=0.2,
        unit_forget_bias=False,
        unroll=3,
        zero_output_for_mask=False,  # Keras's default, the module's is True
    )
    config = layer.get_config()
    for field in ("units", "num_layers", "dropout", "recurrent_dropout", "unit_forget_bias"):
        assert getattr(layer, field) == getattr(layer.module, field) == config[field]
    assert config["unroll"] == 3 and config["remat_chunk"] is None
    with pytest.raises(AttributeError, match=r"units: read-only, it is layer.module.units"):
        layer.units = 7


def test_files_saved_under_the_old_registered_name_still_load():
    layer = BandedLSTMLayer(4, num_layers=2, return_sequences=False)
    serialized = keras.layers.serialize(layer)
    assert serialized["registered_name"] == "interop>BandedLSTMLayer"
    old = {**serialized, "registered_name": "banded_rnn>BandedLSTMLayer"}
    revived = keras.layers.deserialize(old)
    assert type(revived) is BandedLSTMLayer and revived.get_config() == layer.get_config()


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_loading_without_import_interop_names_the_package(tmp_path):
    """Keras imports only its own packages, so a load without `import interop`
    fails; its message shows the registered name and module, which say what to import."""
    inputs = keras.Input((3, None, 4))
    keras.Model(inputs, BandedLSTMLayer(2)(inputs)).save(tmp_path / "model.keras")
    done = run_script(SCRIPTS / "load_keras_model.py", tmp_path / "model.keras", check=False)
    assert done.returncode != 0
    assert "Could not locate class 'BandedLSTMLayer'" in done.stderr
    assert "'registered_name': 'interop>BandedLSTMLayer'" in done.stderr
    assert "'module': 'interop._layer'" in done.stderr


def test_initial_values_follow_keras_unit_forget_bias():
    layer = BandedLSTMLayer(3, num_layers=2)
    layer.build((None, None, None, 4))
    lstm = keras.layers.LSTM(3)
    lstm.build((None, None, 4))
    theirs = [keras.ops.convert_to_numpy(w.value) for w in lstm.weights]
    for ours in interop.to_keras_lstm(layer.get_flax_variables()):
        assert [w.shape for w in ours[1:]] == [w.shape for w in theirs[1:]]
        np.testing.assert_array_equal(ours[2], theirs[2])


def test_flax_variables_round_trip_exactly():
    x = random_inputs(13, (1, 2, 4, 3))
    variables = init_model(BandedLSTM(4, num_layers=2), x, seed=4)
    layer = BandedLSTMLayer(4, num_layers=2)
    layer.set_flax_variables(variables)  # builds the layer
    jax.tree.map(np.testing.assert_array_equal, layer.get_flax_variables(), variables)
    other = BandedLSTMLayer(4, num_layers=2)
    other.set_flax_variables(layer.get_flax_variables())
    jax.tree.map(np.testing.assert_array_equal, other.get_flax_variables(), variables)


def test_layer_is_clean_under_strict_rank_promotion():
    """Every path of the interop code runs under rank promotion "raise" and gives
    the reference's numbers."""
    x = random_inputs(16, (2, 3, 5, 4))
    mask = np.random.default_rng(16).random((2, 5)) < 0.7
    with jax.numpy_rank_promotion("raise"):
        layer, params = _built_layer(
            x, 4, 2, stateful=True, return_state=True, dropout=0.2, zero_output_for_mask=True
        )
        _, start = layer(x, mask=np.ones((2, 3, 5), bool), training=True)
        y, state = layer(x, initial_state=start, mask=mask)
        stored = _state_arrays(layer.get_state())
        layer.reset_state(batch=[0])
        after_reset = _state_arrays(layer.get_state())
        inputs = keras.Input(batch_shape=(2, 3, None, 4))
        model = keras.Model(inputs, layer(inputs)[0])
        model.compile(
            optimizer=keras.optimizers.SGD(0.01), loss=lambda t, p: jnp.mean((t - p) ** 2)
        )
        model.fit(x, np.zeros((2, 3, 5, 4), "float32"), batch_size=2, verbose=0)
        layer.reset_state()
        predicted = model.predict(x, batch_size=2, verbose=0)

    reference_state, expected = lstm_reference(params, x, state=_state_arrays(start), mask=mask)
    np.testing.assert_allclose(y, expected, atol=ATOL)
    _assert_state_close(state, reference_state)
    _assert_state_close([LSTMState(h, c) for h, c in stored], reference_state)
    for (h, c), (h_stored, c_stored) in zip(after_reset, stored, strict=True):
        assert not h[0].any() and not c[0].any()
        np.testing.assert_array_equal(h[1], h_stored[1])
        np.testing.assert_array_equal(c[1], c_stored[1])
    fitted = params_from_variables(layer.get_flax_variables())
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(fitted[0], params[0], strict=True))
    np.testing.assert_allclose(predicted, lstm_reference(fitted, x)[1], atol=ATOL)


# -- bad input ------------------------------------------------------------------------------


def test_keras_layer_names_bad_inputs():
    """As ``apply`` names them, under rank promotion "raise" (tests/core/test_faults.py)."""
    x = random_inputs(1, (2, 3, 7, 2))
    bad_ones = bad_inputs(x)
    layer = BandedLSTMLayer(4)
    with jax.numpy_rank_promotion("raise"):
        for bad, error, message in bad_ones[:3] + bad_ones[4:5]:
            with pytest.raises(error, match=f"^inputs: {message}"):
                layer(bad)


def test_wrong_rank_is_a_clear_error():
    layer = BandedLSTMLayer(3)
    with pytest.raises(ValueError, match=r"rank 4, \[batch, bands, time, features\].*\(2, 5, 4\)"):
        layer(np.zeros((2, 5, 4), "float32"))
    with pytest.raises(ValueError, match=r"for one band, add the bands axis: x\[:, None\]"):
        layer(np.zeros((2, 5, 4), "float32"))
    with pytest.raises(ValueError, match=r"rank 4.*\(None, 5, 4\)"):
        BandedLSTMLayer(3)(keras.Input((5, 4)))
    layer(np.zeros((2, 3, 5, 4), "float32"))
    with pytest.raises(ValueError, match=r"expected 4 features.*\(2, 3, 5, 6\)"):
        layer(np.zeros((2, 3, 5, 6), "float32"))


def test_stateful_layer_rejects_other_batch_or_bands():
    model, layer, _ = _stateful_model(2, 3, 4)
    layer(random_inputs(17, (2, 3, 6, 4)))
    (state_before,) = _state_arrays(layer.get_state())
    assert np.abs(state_before[0]).max() > 0.01
    with pytest.raises(ValueError, match=r"batch 2 x bands 3.*\(1, 3, 6, 4\)"):
        layer(np.ones((1, 3, 6, 4), "float32"))
    (state_after,) = _state_arrays(layer.get_state())
    np.testing.assert_array_equal(state_after[0], state_before[0])
    with pytest.raises(ValueError, match=r"batch 2 x bands 3.*\(2, 4, 6, 4\)"):
        model.predict(np.ones((2, 4, 6, 4), "float32"), batch_size=2, verbose=0)
    with pytest.raises(ValueError, match=r"batch_shape=\(batch, bands, None, features\)"):
        BandedLSTMLayer(3, stateful=True)(keras.Input((3, None, 4)))


def test_initial_state_of_the_wrong_structure_is_a_clear_error():
    x = random_inputs(14, (2, 3, 5, 4))
    layer, _ = _built_layer(x, 4, 2)
    zeros = np.zeros((2, 3, 4), "float32")
    with pytest.raises(TypeError, match=r"initial_state: expected a tuple of 2 LSTMState"):
        layer(x, initial_state=LSTMState(zeros, zeros))
    with pytest.raises(
        ValueError, match=r"initial_state: expected a tuple of 2 LSTMState.*received 1"
    ):
        layer(x, initial_state=(LSTMState(zeros, zeros),))
    with pytest.raises(TypeError, match=r"initial_state\[0\]: expected an LSTMState"):
        layer(x, initial_state=(zeros, zeros))
    wrong = np.zeros((2, 3, 5), "float32")
    with pytest.raises(ValueError, match=r"initial_state\[1\].cell: .*\(2, 3, 4\).*\(2, 3, 5\)"):
        layer(x, initial_state=(LSTMState(zeros, zeros), LSTMState(zeros, wrong)))
    with pytest.raises(TypeError, match=r"initial_state\[0\].hidden: expected a floating dtype"):
        layer(x, initial_state=(LSTMState(zeros.astype("int32"), zeros), LSTMState(zeros, zeros)))


def test_bare_pair_as_initial_state_names_lstm_state_and_the_orders():
    """A one-layer layer given a bare (c, h) pair: the error names LSTMState and
    the orders Keras, PyTorch and Flax use, instead of silently swapping h and c."""
    x = random_inputs(14, (2, 3, 5, 4))
    layer, _ = _built_layer(x, 4, 1)
    c, h = (np.zeros((2, 3, 4), "float32") for _ in range(2))
    with pytest.raises(ValueError) as error:
        layer(x, initial_state=(c, h))
    message = str(error.value)
    assert "initial_state: expected a tuple of 1 LSTMState" in message
    assert "it holds 2 arrays, not layer states" in message
    assert "LSTMState(hidden=h, cell=c)" in message
    assert "Keras orders it [h, c], PyTorch (h, c), Flax (c, h)" in message


def test_other_bad_arguments_are_clear_errors():
    x = random_inputs(15, (2, 3, 5, 4))
    layer, _ = _built_layer(x, 4, 1)
    with pytest.raises(ValueError, match=r"mask: expected shape \[batch, time\]"):
        layer(x, mask=np.ones((2, 5, 3), bool))
    with pytest.raises(ValueError, match=r"units: expected an integer >= 1"):
        BandedLSTMLayer(0)
    with pytest.raises(ValueError, match=r"dropout: expected a rate in \[0, 1\)"):
        BandedLSTMLayer(3, dropout=1.5)

    before = layer.get_flax_variables()
    bad = init_model(BandedLSTM(4, num_layers=1), random_inputs(0, (1, 1, 2, 6)))
    with pytest.raises(ValueError, match=r"kernel'\]: expected shape \(4, 16\).*\(6, 16\)"):
        layer.set_flax_variables(bad)
    with pytest.raises(ValueError, match=r"expected 1 layers of 4 units"):
        layer.set_flax_variables(init_model(BandedLSTM(4, num_layers=2), x))
    jax.tree.map(np.testing.assert_array_equal, layer.get_flax_variables(), before)


def test_reset_state_indices_are_checked_like_stream_reset():
    model, layer, _ = _stateful_model(2, 3, 4)
    layer(random_inputs(18, (2, 3, 6, 4)))
    before = _state_arrays(layer.get_state())
    with pytest.raises(ValueError, match=r"batch: expected indices in \[0, 2\); received \[2\]"):
        layer.reset_state(batch=[2])
    with pytest.raises(TypeError, match=r"batch: expected integer indices; received float 1.0"):
        layer.reset_state(batch=[1.0])
    with pytest.raises(TypeError, match=r"batch: expected integer indices; received bool"):
        layer.reset_state(batch=[True])
    jax.tree.map(np.testing.assert_array_equal, _state_arrays(layer.get_state()), before)
    layer.reset_state(batch=np.int64(1))  # one index, as Stream.reset takes it
    (after,) = _state_arrays(layer.get_state())
    assert not after[0][1].any() and after[0][0].any()


def test_other_backend_is_a_clear_error_at_construction():
    env = script_env(KERAS_BACKEND="numpy")
    done = run_script(SCRIPTS / "make_a_layer.py", env=env, timeout=300, check=False)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr
    assert "'numpy' backend" in done.stderr and "KERAS_BACKEND=jax" in done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="needs TensorFlow absent"
)
def test_backend_that_cannot_import_is_a_clear_error_at_import():
    env = script_env(KERAS_BACKEND="tensorflow")
    done = run_script(SCRIPTS / "make_a_layer.py", env=env, timeout=300, check=False)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: interop runs Keras on its JAX backend")
    assert "KERAS_BACKEND='tensorflow'" in last_line and "KERAS_BACKEND=jax" in last_line
    assert "No module named 'tensorflow'" in done.stderr  # the chained cause
    assert "direct cause of the following exception" in done.stderr
