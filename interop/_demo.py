"""The user's experiment in Keras: first the problem, a shared stateful
``keras.layers.LSTM`` over three band slices (and one band alone), then the fix,
``BandedLSTMLayer``; each predicts a sequence whole and in two halves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from ._convert import from_keras_lstm
from ._layer import BandedLSTMLayer, reset_states


def _whole_minus_halves(model: keras.Model, reset: Callable[[], Any], x: np.ndarray) -> np.ndarray:
    """``predict(x)`` minus ``predict`` of the two halves in turn, each after
    ``reset()``; time is the second-to-last axis of ``x``."""
    reset()
    whole = model.predict(x, verbose=0)
    reset()
    half = x.shape[-2] // 2
    first = model.predict(x[..., :half, :], verbose=0)
    second = model.predict(x[..., half:, :], verbose=0)
    return whole - np.concatenate([first, second], axis=-2)


def _shared_keras_lstm(x: np.ndarray, units: int) -> tuple[np.ndarray, keras.layers.LSTM]:
    """One stateful ``keras.layers.LSTM`` called on every band slice ``x[:, band]``;
    returns whole minus halves and the LSTM."""
    batch, bands, _, features = x.shape
    inputs = keras.Input(batch_shape=(batch, bands, None, features))
    shared = keras.layers.LSTM(
        units,
        stateful=True,
        return_sequences=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        recurrent_initializer=keras.initializers.Orthogonal(seed=2),
    )
    per_band = [shared(inputs[:, band]) for band in range(bands)]
    model = keras.Model(inputs, keras.ops.stack(per_band, axis=1))
    return _whole_minus_halves(model, shared.reset_state, x), shared


def _one_band_keras_lstm(x_band: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """A stateful ``keras.layers.LSTM`` on one band ``[batch, time, features]``:
    whole minus halves."""
    batch, _, features = x_band.shape
    inputs = keras.Input(batch_shape=(batch, None, features))
    lstm = keras.layers.LSTM(weights[1].shape[0], stateful=True, return_sequences=True)
    model = keras.Model(inputs, lstm(inputs))
    lstm.set_weights(weights)
    return _whole_minus_halves(model, lstm.reset_state, x_band)


def _banded_layer(x: np.ndarray, shared: keras.layers.LSTM) -> tuple[np.ndarray, np.ndarray]:
    """``BandedLSTMLayer`` with the weights of ``shared``: whole minus halves,
    and whole minus ``keras.layers.LSTM`` run on each band alone."""
    batch, bands, _, features = x.shape
    inputs = keras.Input(batch_shape=(batch, bands, None, features))
    layer = BandedLSTMLayer(shared.units, stateful=True)
    model = keras.Model(inputs, layer(inputs))
    layer.set_flax_variables(from_keras_lstm(shared))
    halves_diff = _whole_minus_halves(model, lambda: reset_states(model), x)

    single = keras.layers.LSTM(shared.units, return_sequences=True)
    single.build((batch, None, features))
    single.set_weights([keras.ops.convert_to_numpy(w.value) for w in shared.weights])
    separate = np.stack([keras.ops.convert_to_numpy(single(x[:, b])) for b in range(bands)], 1)
    reset_states(model)
    return halves_diff, model.predict(x, verbose=0) - separate


def run_keras_demo(
    batch: int = 1, bands: int = 3, time: int = 50, features: int = 4, units: int = 3
) -> dict[str, float]:
    """Runs the experiment on inputs ``[batch, bands, time, features]``, prints
    the problem and then the fix, and returns the measured differences.

    The problem: a shared ``keras.layers.LSTM(units, stateful=True)`` called on
    every band slice ``x[:, band]`` has one state for all call sites, so the
    halves differ from the whole; a one-band stateful LSTM differs too, as the
    compiled ``predict`` drops its state. The fix: ``BandedLSTMLayer`` with the
    same weights keeps one state per band: the halves equal the whole, and the
    whole equals ``keras.layers.LSTM`` run on each band separately.
    """
    x = np.random.default_rng(0).standard_normal((batch, bands, time, features)).astype("float32")
    half = time // 2
    shared_diff, shared = _shared_keras_lstm(x, units)
    weights = [keras.ops.convert_to_numpy(w.value) for w in shared.weights]
    alone_diff = _one_band_keras_lstm(x[:, 0], weights)
    banded_diff, banded_vs_separate = _banded_layer(x, shared)
    results = {
        "keras_shared_lstm_sum_abs": float(np.abs(shared_diff).sum()),
        "keras_shared_lstm_first_half_sum_abs": float(np.abs(shared_diff[:, :, :half]).sum()),
        "keras_one_band_lstm_sum_abs": float(np.abs(alone_diff).sum()),
        "banded_layer_sum_abs": float(np.abs(banded_diff).sum()),
        "banded_layer_max_abs": float(np.abs(banded_diff).max()),
        "banded_vs_separate_lstm_max_abs": float(np.abs(banded_vs_separate).max()),
    }
    _print_problem(results, x.shape, units)
    _print_fix(results, units)
    return results


def _print_problem(results: dict[str, float], shape: tuple[int, ...], units: int) -> None:
    time = shape[2]
    half = time // 2
    print(f"THE PROBLEM, in Keras {keras.__version__} ({keras.backend.backend()} backend)")
    print(
        f"  Experiment: inputs {shape} [batch, bands, time, features], {units} units. Predict "
        f"steps 0-{time - 1} in one call; reset the state; predict steps 0-{half - 1}, then "
        f"steps {half}-{time - 1}. If every band carries its own state from call to call, "
        "both give the same outputs: summed |diff| = 0."
    )
    print("  One stateful keras.layers.LSTM called on each band slice x[:, b] (shared weights):")
    print(
        "    all steps: summed |diff| = "
        + _problem(results["keras_shared_lstm_sum_abs"], "the bands share one state")
    )
    print(
        f"    first half only (steps 0-{half - 1}): summed |diff| = "
        + _problem(
            results["keras_shared_lstm_first_half_sum_abs"],
            "even before a second call: band 1 starts from the state band 0 ended with, and "
            f"band 2 from band 1's, at step {time - 1} in one call but at step {half - 1} in two",
        )
    )
    print("  One band alone, x[:, 0], with its own stateful keras.layers.LSTM (same weights):")
    print(
        "    all steps: summed |diff| = "
        + _problem(
            results["keras_one_band_lstm_sum_abs"],
            "Keras 3's JAX backend does not track the LSTM's state variables, so the "
            f"compiled predict drops the state and steps {half}-{time - 1} start from zeros",
        )
    )


def _print_fix(results: dict[str, float], units: int) -> None:
    print(
        f"THE FIX, in Keras: interop.BandedLSTMLayer({units}, stateful=True), the same "
        "weights, one state per band kept in tracked Keras variables"
    )
    print(
        f"    all steps, one call vs two: summed |diff| = {results['banded_layer_sum_abs']:.3g}, "
        f"max |diff| = {results['banded_layer_max_abs']:.3g}: "
        + (
            "identical, every band continues from its own state"
            if results["banded_layer_max_abs"] == 0
            else "NOT identical: please report this"
        )
    )
    print(
        "    vs keras.layers.LSTM run on each band alone, all steps in one call: max |diff| = "
        f"{results['banded_vs_separate_lstm_max_abs']:.3g}: every band is that LSTM, up to "
        "float32 rounding"
    )


def _problem(value: float, why: str) -> str:
    """``value`` and what a non-zero difference means (or that there is none)."""
    if value == 0:
        return "0: no difference with this Keras version"
    return f"{value:.3g}, not 0: {why}"
