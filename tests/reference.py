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


def directional_reference(
    variables,
    inputs,
    *,
    state=None,
    seq_lengths=None,
    mask=None,
    reverse=False,
    keep_order=False,
    bidirectional=False,
    merge="concat",
    activation=np.tanh,
    recurrent_activation=_sigmoid,
    zero_output=True,
):
    """An LSTM stack with every option of ``BandedLSTM``, one (sequence, band)
    and one direction at a time, in float64.

    ``variables['params']`` holds ``layer_{i}`` (and ``layer_{i}_reverse`` when
    ``bidirectional``), ``bias`` optional. ``state``: a list of ``(hidden,
    cell)`` per layer and direction (layer 0 forward, layer 0 backward, ...).
    A backward direction visits, with ``seq_lengths``, the steps ``len - 1 ...
    0`` then the padding ``time - 1 ... len`` (flax's ``flip_sequences``);
    otherwise ``time - 1 ... 0``, skipping masked steps; with ``reverse`` every
    layer does, each reading its predecessor's outputs in input order, and the
    last layer's come out in visiting order unless ``keep_order``. A skipped step outputs
    zeros, or with ``zero_output=False`` the last output before it in visiting
    order (the initial hidden state before any). Returns ``(final_state,
    outputs)`` as lists per layer and direction, and ``[batch, bands, time, width]``.
    """
    params = variables["params"]
    x = np.asarray(inputs, np.float64)
    batch, bands, time, _ = x.shape
    lengths = np.full((batch, bands), time)
    if seq_lengths is not None:
        lengths = np.broadcast_to(np.asarray(seq_lengths).reshape(batch, -1), (batch, bands))
        lengths = np.minimum(lengths, time)
    valid = np.ones((batch, bands, time), bool)
    if mask is not None:
        valid = np.broadcast_to(np.asarray(mask, bool).reshape(batch, -1, time), valid.shape)
    directions = [False, True] if bidirectional else [reverse]
    num_layers = sum(1 for name in params if not name.endswith("_reverse"))

    def weights(name):
        p = params[name]
        kernel = np.asarray(p["kernel"], np.float64)
        bias = np.asarray(p["bias"], np.float64) if "bias" in p else 0.0
        return kernel, np.asarray(p["recurrent_kernel"], np.float64), bias

    finals = {}
    outputs = None
    for b in range(batch):
        for n in range(bands):
            sequence = x[b, n]
            length = lengths[b, n]
            for layer in range(num_layers):
                results = []
                for d, backward in enumerate(directions):
                    index = layer * len(directions) + d
                    kernel, recurrent_kernel, bias = weights(
                        f"layer_{layer}" + ("_reverse" if d else "")
                    )
                    units = recurrent_kernel.shape[0]
                    if state is None:
                        h, c = np.zeros(units), np.zeros(units)
                    else:
                        h = np.array(state[index][0][b, n], np.float64)
                        c = np.array(state[index][1][b, n], np.float64)
                    if not backward:
                        order = list(range(time))
                    elif seq_lengths is not None:
                        order = list(range(length - 1, -1, -1)) + list(
                            range(time - 1, length - 1, -1)
                        )
                    else:
                        order = list(range(time - 1, -1, -1))
                    visited = np.zeros((time, units))  # in visiting order
                    for p, t in enumerate(order):
                        if t < length and valid[b, n, t]:
                            z = sequence[t] @ kernel + h @ recurrent_kernel + bias
                            i = recurrent_activation(z[:units])
                            f = recurrent_activation(z[units : 2 * units])
                            g = activation(z[2 * units : 3 * units])
                            o = recurrent_activation(z[3 * units :])
                            c = f * c + i * g
                            h = o * activation(c)
                            visited[p] = h
                        elif not zero_output:
                            visited[p] = h
                    finals.setdefault(index, [np.zeros((batch, bands, units)) for _ in range(2)])
                    finals[index][0][b, n], finals[index][1][b, n] = h, c
                    # In input order, for the next layer: every layer of a
                    # reversed stack runs backwards in time.
                    out = np.zeros((time, units))
                    out[order] = visited
                    results.append(out)
                if len(results) == 1:
                    sequence = results[0]
                elif merge == "concat":
                    sequence = np.concatenate(results, axis=-1)
                elif merge == "sum":
                    sequence = results[0] + results[1]
                elif merge == "mul":
                    sequence = results[0] * results[1]
                else:
                    sequence = (results[0] + results[1]) / 2
            if reverse and not bidirectional and not keep_order:
                sequence = sequence[order]  # the last layer's outputs in visiting order
            if outputs is None:
                outputs = np.zeros((batch, bands, time, sequence.shape[-1]))
            outputs[b, n] = sequence
    final = [tuple(finals[i]) for i in range(len(finals))]
    return final, outputs
