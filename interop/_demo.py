"""The user's experiment in Keras: a shared stateful ``keras.layers.LSTM`` over
three band slices, beside ``BandedLSTMLayer``, each predicting a sequence whole
and in two halves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from ._convert import from_keras_lstm
from ._layer import BandedLSTMLayer, reset_states


def _whole_and_halves(model: keras.Model, reset: Callable[[], Any], x: np.ndarray) -> np.ndarray:
    """``predict(x)`` minus ``predict`` of the two halves in turn, each after
    ``reset()``; time is the second-to-last axis of ``x``."""
    reset()
    whole = model.predict(x, verbose=0)
    reset()
    half = x.shape[-2] // 2
    first = model.predict(x[..., :half, :], verbose=0)
    second = model.predict(x[..., half:, :], verbose=0)
    return whole - np.concatenate([first, second], axis=-2)


def run_keras_demo(
    batch: int = 1, bands: int = 3, time: int = 50, features: int = 4, units: int = 3
) -> dict[str, float]:
    """Runs the experiment on inputs ``[batch, bands, time, features]``, prints
    the differences and returns them.

    The shared ``keras.layers.LSTM(units, stateful=True)`` is called on every
    band slice ``x[:, band]`` of a Functional model: the call sites share one
    state, so the halves differ from the whole. ``BandedLSTMLayer`` with the
    same weights keeps one state per band: the halves equal the whole, and the
    whole equals ``keras.layers.LSTM`` run on each band separately.
    """
    x = np.random.default_rng(0).standard_normal((batch, bands, time, features)).astype("float32")
    inputs = keras.Input(batch_shape=(batch, bands, None, features))

    shared = keras.layers.LSTM(
        units,
        stateful=True,
        return_sequences=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        recurrent_initializer=keras.initializers.Orthogonal(seed=2),
    )
    per_band = [shared(inputs[:, band]) for band in range(bands)]
    shared_model = keras.Model(inputs, keras.ops.stack(per_band, axis=1))
    shared_diff = _whole_and_halves(shared_model, shared.reset_state, x)

    weights = [keras.ops.convert_to_numpy(w.value) for w in shared.weights]
    banded = BandedLSTMLayer(units, stateful=True)
    banded_model = keras.Model(inputs, banded(inputs))
    banded.set_flax_variables(from_keras_lstm(shared))
    banded_diff = _whole_and_halves(banded_model, lambda: reset_states(banded_model), x)

    # One band alone still differs: the compiled predict loop drops the state
    # of keras.layers.LSTM, whose state variables the JAX trainer does not see.
    band_inputs = keras.Input(batch_shape=(batch, None, features))
    alone = keras.layers.LSTM(units, stateful=True, return_sequences=True)
    alone_model = keras.Model(band_inputs, alone(band_inputs))
    alone.set_weights(weights)
    alone_diff = _whole_and_halves(alone_model, alone.reset_state, x[:, 0])

    single = keras.layers.LSTM(units, return_sequences=True)
    single.build((batch, None, features))
    single.set_weights(weights)
    separate = np.stack([keras.ops.convert_to_numpy(single(x[:, b])) for b in range(bands)], 1)
    reset_states(banded_model)
    banded_vs_separate = banded_model.predict(x, verbose=0) - separate

    results = {
        "keras_shared_lstm_sum_abs": float(np.abs(shared_diff).sum()),
        "keras_shared_lstm_first_half_sum_abs": float(np.abs(shared_diff[:, :, : time // 2]).sum()),
        "keras_one_band_lstm_sum_abs": float(np.abs(alone_diff).sum()),
        "banded_layer_sum_abs": float(np.abs(banded_diff).sum()),
        "banded_layer_max_abs": float(np.abs(banded_diff).max()),
        "banded_vs_separate_lstm_max_abs": float(np.abs(banded_vs_separate).max()),
    }
    print(
        f"Keras {keras.__version__} ({keras.backend.backend()} backend), inputs "
        f"{x.shape} [batch, bands, time, features], {units} units, predict whole vs two halves:"
    )
    print(
        f"  shared stateful keras.layers.LSTM over the {bands} band slices: summed |diff| = "
        f"{results['keras_shared_lstm_sum_abs']:.3g} (first half alone: "
        f"{results['keras_shared_lstm_first_half_sum_abs']:.3g}): the bands share one state"
    )
    print(
        "  one band alone, stateful keras.layers.LSTM: summed |diff| = "
        f"{results['keras_one_band_lstm_sum_abs']:.3g}: compiled predict drops its state"
    )
    print(
        f"  interop.BandedLSTMLayer({units}, stateful=True), same weights: summed |diff| = "
        f"{results['banded_layer_sum_abs']:.3g}, max |diff| = {results['banded_layer_max_abs']:.3g}"
    )
    print(
        "  BandedLSTMLayer vs keras.layers.LSTM run on each band on its own: max |diff| = "
        f"{results['banded_vs_separate_lstm_max_abs']:.3g}"
    )
    return results
