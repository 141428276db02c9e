"""The serving tests' model and what they compare with: each sequence streamed
alone. Also the model ``python -m banded_rnn serve served_model:make`` serves."""

from __future__ import annotations

import threading
from functools import partial

import jax
import numpy as np

from banded_rnn import BandedLSTM, Stream, kernel_info

from helpers import init_model, random_inputs

BANDS, FEATURES, UNITS = 4, 6, 5
MODEL = BandedLSTM(UNITS, num_layers=2)
VARIABLES = init_model(MODEL, random_inputs(0, (1, BANDS, 3, FEATURES)))
KERNEL = kernel_info()["kernel"] == "built"  # bit for bit: the kernel's rows do not mix


def make():
    """``(model, variables)``: a 2-layer BandedLSTM of 5 units over 4 bands of 6 features."""
    return MODEL, VARIABLES


def not_a_model():
    return "model", None


def frames_of(seed: int, count: int, frame_length: int = 1) -> np.ndarray:
    """``count`` random frames ``[bands, frame_length, features]`` of one sequence."""
    return random_inputs(seed, (count, BANDS, frame_length, FEATURES))


_STREAMS: dict = {}


def alone(frames, model=MODEL, variables=VARIABLES, features=None):
    """``frames`` of one sequence run alone through a Stream, from zeros: (outputs, state)."""
    key = (id(model), id(variables), frames.shape[2])
    if key not in _STREAMS:  # one per model and frame length: each compiles its step
        _STREAMS[key] = Stream(model, variables, 1, BANDS, frames.shape[2], features=features)
    stream = _STREAMS[key]
    stream.reset()
    outputs = np.stack([stream(frame[None])[0] for frame in frames])
    return outputs, jax.tree.map(lambda leaf: np.asarray(leaf)[0], stream.state)


def assert_same(received, expected, exact: bool = KERNEL) -> None:
    """Bit for bit where the native kernel runs the model; else within float32 rounding."""
    if exact:
        jax.tree.map(np.testing.assert_array_equal, received, expected)
    else:
        close = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
        jax.tree.map(close, received, expected)


def run_threads(client, arguments) -> None:
    """Runs ``client(argument)`` in a thread for each of ``arguments``; raises
    the first error any of them raised."""
    errors = []

    def run(argument):
        try:
            client(argument)
        except Exception as error:  # pragma: no cover - raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
