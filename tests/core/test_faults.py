"""Faults of the core injected for real: lengths past int32, bad inputs and
variables, inputs on another device than the variables. Every result is checked
against the float64 NumPy reference. (The stream's, the training loop's and the
Keras layer's are in their own folders' tests.)"""

from pathlib import Path

import jax
import numpy as np
import pytest

from banded_rnn import BandedLSTM

from helpers import bad_inputs, init_model, random_inputs, run_script
from reference import lstm_reference, params_from_variables

BATCH, BANDS, FEATURES, UNITS = 2, 3, 2, 4
MODEL = BandedLSTM(UNITS)
X = random_inputs(1, (BATCH, BANDS, 7, FEATURES))
VARIABLES = init_model(MODEL, X)
PARAMS = params_from_variables(VARIABLES)
BAD_INPUTS = bad_inputs(X)


# -- lengths past int32 -------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["kernel", "scan"])
@pytest.mark.parametrize(
    "lengths",
    [
        np.array([2**40, 3], np.int64),
        np.array([2**32 + 2, 3], np.uint64),
        np.array([3_000_000_000, 3], np.uint32),
        np.array([2**31, 3], np.int64),
    ],
    ids=["int64-2**40", "uint64-2**32+2", "uint32-3e9", "int64-2**31"],
)
def test_lengths_past_int32_mean_every_step_valid(implementation, lengths):
    """A length past int32 used to wrap when cast (2**40 became 0 valid steps);
    it means every step is valid, as any length >= time does."""
    model = BandedLSTM(UNITS, implementation=implementation)
    final, outputs = model.apply(VARIABLES, None, X, seq_lengths=lengths)
    expected_final, expected = lstm_reference(PARAMS, X, None, np.array([7, 3]))
    np.testing.assert_allclose(outputs, expected, atol=2e-5)
    np.testing.assert_allclose(final[0].hidden, expected_final[0][0], atol=2e-5)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_short_integer_lengths_are_not_clipped_in_their_own_dtype(dtype, jit):
    """300 steps: a clip to time in int8 would wrap (300 becomes 44)."""
    x = random_inputs(2, (2, 1, 300, FEATURES))
    lengths = np.array([100, 7], dtype)
    run = lambda x, n: MODEL.apply(VARIABLES, None, x, seq_lengths=n)[1]  # noqa: E731
    outputs = (jax.jit(run) if jit else run)(x, lengths)
    expected = lstm_reference(PARAMS, x, None, np.array([100, 7]))[1]
    np.testing.assert_allclose(outputs, expected, atol=3e-5)


def test_uint32_lengths_past_int32_under_jit():
    """Traced, the clip runs in the lengths' own dtype before the cast."""
    run = jax.jit(lambda x, n: MODEL.apply(VARIABLES, None, x, seq_lengths=n)[1])
    outputs = run(X, np.array([4_000_000_000, 2], np.uint32))
    np.testing.assert_allclose(outputs, lstm_reference(PARAMS, X, None, [7, 2])[1], atol=2e-5)


# -- bad input of every kind ----------------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_inputs_are_named_by_apply(bad, error, message):
    with pytest.raises(error, match=f"^inputs: {message}"):
        MODEL.apply(VARIABLES, None, bad)


@pytest.mark.parametrize("variables", [{}, {"params": {}}], ids=["empty", "no-params"])
def test_missing_variables_are_named(variables):
    with pytest.raises(ValueError, match=r"^variables: expected BandedLSTM variables"):
        MODEL.apply(variables, None, X)


def test_inputs_on_another_device_than_the_variables_are_named():
    run_script(Path(__file__).parent / "scripts" / "inputs_on_another_device.py")
