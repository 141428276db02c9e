"""An independent float64 NumPy reference: plain loops over batch, bands, layers and time.

It shares no code with the package. Parameters are given per layer as
``(kernel [features, 4u], recurrent_kernel [u, 4u], bias [4u])`` with the gates
``i, f, g, o``, the layout of ``keras.layers.LSTM``.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def params_from_variables(variables) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Reads ``params/layer_{i}/{kernel, recurrent_kernel, bias}`` as float64."""
    params = variables["params"]
    return [
        tuple(
            np.asarray(params[f"layer_{i}"][name], np.float64)
            for name in ("kernel", "recurrent_kernel", "bias")
        )
        for i in range(len(params))
    ]


def lstm_reference(params, inputs, state=None, seq_lengths=None, mask=None):
    """Runs a stacked LSTM on every (sequence, band) separately.

    Args:
      params: list of ``(kernel, recurrent_kernel, bias)``, one per layer.
      inputs: ``[batch, bands, time, features]``.
      state: optional list, per layer, of ``(hidden, cell)`` each ``[batch, bands, units]``.
      seq_lengths: optional ``[batch]`` or ``[batch, bands]`` integers.
      mask: optional booleans ``[batch, time]`` or ``[batch, bands, time]``:
        a masked step leaves the state unchanged and outputs zeros.

    Returns:
      ``(final_state, outputs)``: list per layer of ``(hidden, cell)``, and
      ``[batch, bands, time, units]``, all float64.
    """
    x = np.asarray(inputs, np.float64)
    batch, bands, time, _ = x.shape
    units = params[0][1].shape[0]
    lengths = np.full((batch, bands), time)
    if seq_lengths is not None:
        lengths = np.broadcast_to(np.asarray(seq_lengths).reshape(batch, -1), (batch, bands))
    valid = np.ones((batch, bands, time), bool)
    if mask is not None:
        mask = np.asarray(mask, bool)
        valid = np.broadcast_to(mask.reshape(batch, -1, time), (batch, bands, time))
    outputs = np.zeros((batch, bands, time, units))
    final = [(np.zeros((batch, bands, units)), np.zeros((batch, bands, units))) for _ in params]
    for b in range(batch):
        for n in range(bands):
            sequence = x[b, n]
            for layer, (kernel, recurrent_kernel, bias) in enumerate(params):
                if state is None:
                    h = np.zeros(units)
                    c = np.zeros(units)
                else:
                    h = np.array(state[layer][0][b, n], np.float64)
                    c = np.array(state[layer][1][b, n], np.float64)
                layer_out = np.zeros((time, units))
                for t in range(time):
                    if t >= lengths[b, n] or not valid[b, n, t]:
                        continue
                    z = sequence[t] @ kernel + h @ recurrent_kernel + bias
                    i = _sigmoid(z[:units])
                    f = _sigmoid(z[units : 2 * units])
                    g = np.tanh(z[2 * units : 3 * units])
                    o = _sigmoid(z[3 * units :])
                    c = f * c + i * g
                    h = o * np.tanh(c)
                    layer_out[t] = h
                final[layer][0][b, n] = h
                final[layer][1][b, n] = c
                sequence = layer_out
            outputs[b, n] = sequence
    return final, outputs


def _dense(params, x: np.ndarray) -> np.ndarray:
    return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def subband_mask_reference(params, inputs, state=None, seq_lengths=None):
    """``tests.helpers.SubbandMask`` in float64: ``tanh`` encoder, the LSTM
    stack, a sigmoid mask times the inputs. ``params`` is the model's
    ``variables["params"]``; ``state`` per layer ``(hidden, cell)``."""
    x = np.asarray(inputs, np.float64)
    lstm = params_from_variables({"params": params["lstm"]})
    final, outputs = lstm_reference(
        lstm, np.tanh(_dense(params["encoder"], x)), state, seq_lengths=seq_lengths
    )
    return final, _sigmoid(_dense(params["head"], outputs)) * x


def two_in_series_reference(params, inputs, state=None):
    """``tests.helpers.TwoInSeries`` in float64; ``state`` a dict ``low`` /
    ``high`` of per-layer ``(hidden, cell)``."""
    state = state or {"low": None, "high": None}
    low_params = params_from_variables({"params": params["low"]})
    high_params = params_from_variables({"params": params["high"]})
    low, hidden = lstm_reference(low_params, inputs, state["low"])
    high, outputs = lstm_reference(high_params, _dense(params["mid"], hidden), state["high"])
    return {"low": low, "high": high}, outputs
