"""``lstm_gates``, the gate maths written once, against float64 NumPy."""

import numpy as np
import pytest

from banded_rnn import lstm_gates


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def gates_reference(preactivations, cell):
    """``(hidden, cell)`` in float64, one vector ``[4 * units]`` at a time."""
    z = np.asarray(preactivations, np.float64)
    c = np.asarray(cell, np.float64)
    units = c.shape[-1]
    hidden, new_cell = np.zeros(c.shape), np.zeros(c.shape)
    for index in np.ndindex(c.shape[:-1]):
        row = z[index]
        i = _sigmoid(row[:units])
        f = _sigmoid(row[units : 2 * units])
        g = np.tanh(row[2 * units : 3 * units])
        o = _sigmoid(row[3 * units :])
        new_cell[index] = f * c[index] + i * g
        hidden[index] = o * np.tanh(new_cell[index])
    return hidden, new_cell


@pytest.mark.parametrize(
    "leading, units",
    [((), 1), ((5,), 3), ((2, 3), 4), ((2, 3, 7), 5)],
    ids=["vector", "rows", "batch_bands", "batch_bands_time"],
)
def test_matches_float64_reference(leading, units):
    rng = np.random.default_rng(len(leading) * 10 + units)
    # Scale 3: some gates near saturation, some in the linear range.
    z = (3.0 * rng.standard_normal((*leading, 4 * units))).astype(np.float32)
    c = (2.0 * rng.standard_normal((*leading, units))).astype(np.float32)
    hidden, cell = lstm_gates(z, c)
    expected_hidden, expected_cell = gates_reference(z, c)
    assert hidden.shape == cell.shape == (*leading, units)
    assert hidden.dtype == cell.dtype == np.float32
    np.testing.assert_allclose(np.asarray(hidden), expected_hidden, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cell), expected_cell, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", ["i", "f", "g", "o"])
def test_gate_order_is_i_f_g_o(gate):
    """Every pre-activation is 1 except one gate's slice, 30 (saturated): that gate
    alone is 1, and each gate leaves a different mark on ``(hidden, cell)``."""
    units, slot = 3, "ifgo".index(gate)
    z = np.ones((2, 4 * units), np.float32)
    z[:, slot * units : (slot + 1) * units] = 30.0
    c = np.random.default_rng(7).standard_normal((2, units)).astype(np.float32)
    hidden, cell = lstm_gates(z, c)
    s, t = _sigmoid(1.0), np.tanh(1.0)
    i = 1.0 if gate == "i" else s
    f = 1.0 if gate == "f" else s
    g = 1.0 if gate == "g" else t
    o = 1.0 if gate == "o" else s
    expected_cell = f * c.astype(np.float64) + i * g
    np.testing.assert_allclose(np.asarray(cell), expected_cell, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hidden), o * np.tanh(expected_cell), rtol=1e-6, atol=1e-6)
