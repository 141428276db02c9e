"""One ``BandedLSTM`` call as ONNX ``LSTM`` operators, one per layer.

The bands are folded into the operator's batch and the sequence runs
time-major (``layout=0``, the layout every runtime implements), so the layers
chain with no transpose between them. The weights are converted once, here:
Keras's gate order ``i, f, g, o`` becomes ONNX's ``i, o, f, c``, ``kernel [in,
4u]`` becomes ``W [directions, 4u, in]``, ``recurrent_kernel [u, 4u]`` becomes
``R [directions, 4u, u]``, and ``bias`` the first half of ``B [directions,
8u]`` (the recurrent bias, its second half, is zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._cell import ACTIVATIONS, activation_fn
from .._directions import directions

ONNX_ACTIVATIONS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "tanh": ("Tanh", (), ()),
    "sigmoid": ("Sigmoid", (), ()),
    "relu": ("Relu", (), ()),
    "linear": ("Affine", (1.0,), (0.0,)),
    "hard_sigmoid": ("HardSigmoid", (1.0 / 6.0,), (0.5,)),
    "softsign": ("Softsign", (), ()),
    "softplus": ("Softplus", (), ()),
    "elu": ("Elu", (1.0,), ()),
    "leaky_relu": ("LeakyRelu", (0.2,), ()),
}
"""The activations of :data:`ACTIVATIONS` that ONNX's ``LSTM`` takes: the
ONNX name and its ``activation_alpha`` and ``activation_beta`` values, which
give Keras 3's definitions (``hard_sigmoid = relu6(x + 3) / 6`` is
``HardSigmoid`` with alpha 1/6 and beta 1/2)."""

_GATES_TO_ONNX = (0, 3, 1, 2)
"""ONNX's gates ``i, o, f, c`` as indices into Keras's ``i, f, g, o``."""


@dataclasses.dataclass(frozen=True)
class LSTMCall:
    """What one ``BandedLSTM`` call needs to become ONNX operators: where it
    sits in the model (``layer``, for messages), its options, and its
    parameters as NumPy arrays, per layer direction name."""

    layer: str
    units: int
    num_layers: int
    bands: int
    reverse: bool
    keep_order: bool
    bidirectional: bool
    merge_mode: str
    activations: tuple[str, str]
    params: dict[str, dict[str, np.ndarray]]
    has_state: bool

    @property
    def output_units(self) -> int:
        doubled = self.bidirectional and self.merge_mode == "concat"
        return 2 * self.units if doubled else self.units


def onnx_activation(activation: Any, argument: str, layer: str) -> str:
    """The name in :data:`ONNX_ACTIVATIONS` of ``activation`` (a name or one
    of the package's activation functions), or ``ValueError`` naming the
    argument and the layer."""
    fn = activation_fn(activation, argument)
    name = next((key for key, value in ACTIVATIONS.items() if value is fn), None)
    if name in ONNX_ACTIVATIONS:
        return name
    shown = activation if isinstance(activation, str) else getattr(fn, "__name__", repr(fn))
    raise ValueError(
        f"{argument}: ONNX's LSTM operator takes the activations {sorted(ONNX_ACTIVATIONS)}; "
        f"received {shown!r} in the BandedLSTM at {layer}, which cannot be exported"
    )


def onnx_weights(
    params: dict[str, np.ndarray], units: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction's ``(W [4u, in], R [4u, u], B [8u])`` in ONNX's gate
    order, float32, from its Keras-layout parameters."""

    def reorder(matrix: np.ndarray) -> np.ndarray:  # [..., 4u] i f g o -> [4u, ...] i o f c
        gates = np.split(np.asarray(matrix, np.float32).T, 4, axis=0)
        return np.concatenate([gates[i] for i in _GATES_TO_ONNX], axis=0)

    bias = params.get("bias")
    bias = np.zeros(4 * units, np.float32) if bias is None else reorder(bias[None]).ravel()
    return (
        reorder(params["kernel"]),
        reorder(params["recurrent_kernel"]),
        np.concatenate([bias, np.zeros(4 * units, np.float32)]),
    )


def lstm_nodes(graph: Any, call: LSTMCall, inputs: str, state: Sequence[str]) -> list[str]:
    """Adds the operators of ``call`` to ``graph`` (an ``_onnx_graph.Graph``).

    ``inputs`` names ``[batch, bands, time, features]``; ``state`` the
    ``2 * num_layers * num_directions`` leaves ``hidden, cell, ...`` (each
    ``[batch, bands, units]``), or is empty for the zero state. Returns the
    names of the final state's leaves, in that order, then of the outputs
    ``[batch, bands, time, output_units]``.
    """
    units, bands = call.units, call.bands
    features = call.params["layer_0"]["kernel"].shape[0]
    sequence = graph.node("Transpose", [inputs], perm=[2, 0, 1, 3])
    sequence = graph.node("Reshape", [sequence, graph.ints([0, -1, features])])  # [T, N, F]
    final_state: list[str] = []
    for layer in range(call.num_layers):
        layer_directions = directions(
            layer,
            call.num_layers,
            reverse=call.reverse,
            bidirectional=call.bidirectional,
            keep_order=call.keep_order,
        )
        count = len(layer_directions)
        weights = [onnx_weights(call.params[d.name], units) for d in layer_directions]
        w, r, b = (graph.const(np.stack(arrays)) for arrays in zip(*weights, strict=True))
        initial = ["", ""]
        if call.has_state:
            indices = [d.index for d in layer_directions]
            initial = [
                _stacked_state(graph, [state[2 * i + field] for i in indices], units)
                for field in (0, 1)
            ]
        activation, recurrent = (ONNX_ACTIVATIONS[name] for name in call.activations)
        functions = (recurrent, activation, activation) * count
        y, y_h, y_c = graph.node(
            "LSTM",
            [sequence, w, r, b, "", *initial],
            outputs=3,
            hidden_size=units,
            direction=_onnx_direction(call, count),
            activations=[f[0] for f in functions],
            activation_alpha=[alpha for f in functions for alpha in f[1]] or None,
            activation_beta=[beta for f in functions for beta in f[2]] or None,
        )
        hidden, cell = (_split_directions(graph, y_h, count), _split_directions(graph, y_c, count))
        for pair in zip(hidden, cell, strict=True):  # per direction, in the state's order
            final_state += [_unfolded_state(graph, leaf, bands, units) for leaf in pair]
        sequence = _merged(graph, y, count, call.merge_mode, units)  # [T, N, width]
    if call.reverse and not call.keep_order:  # the outputs in the order the steps ran
        sequence = graph.node(
            "Slice",
            [sequence, graph.ints([-1]), graph.ints([np.iinfo(np.int64).min]), graph.ints([0])]
            + [graph.ints([-1])],
        )
    outputs = graph.node("Reshape", [sequence, graph.ints([0, -1, bands, call.output_units])])
    return final_state + [graph.node("Transpose", [outputs], perm=[1, 2, 0, 3])]


def _onnx_direction(call: LSTMCall, count: int) -> str:
    if count == 2:
        return "bidirectional"
    return "reverse" if call.reverse else "forward"


def _stacked_state(graph: Any, leaves: list[str], units: int) -> str:
    """Leaves ``[batch, bands, units]``, one per direction, as ONNX's
    ``initial_h`` / ``initial_c`` ``[directions, batch * bands, units]``."""
    joined = leaves[0] if len(leaves) == 1 else graph.node("Concat", leaves, axis=0)
    return graph.node("Reshape", [joined, graph.ints([len(leaves), -1, units])])


def _split_directions(graph: Any, stacked: str, count: int) -> list[str]:
    """``Y_h`` or ``Y_c`` ``[directions, batch * bands, units]``, one name per direction."""
    if count == 1:
        return [stacked]
    return graph.node("Split", [stacked], outputs=count, axis=0, num_outputs=count)


def _unfolded_state(graph: Any, leaf: str, bands: int, units: int) -> str:
    """``[1, batch * bands, units]`` as a state leaf ``[batch, bands, units]``."""
    return graph.node("Reshape", [leaf, graph.ints([-1, bands, units])])


def _merged(graph: Any, y: str, count: int, mode: str, units: int) -> str:
    """ONNX's ``Y [time, directions, batch * bands, units]`` (each direction in
    input order) as the next layer's inputs ``[time, batch * bands, width]``,
    two directions merged as ``merge_mode`` says."""
    if count == 1:
        return graph.node("Squeeze", [y, graph.ints([1])])
    if mode == "concat":  # the forward half first
        pairs = graph.node("Transpose", [y], perm=[0, 2, 1, 3])
        return graph.node("Reshape", [pairs, graph.ints([0, 0, 2 * units])])
    reduce = {"sum": "ReduceSum", "mul": "ReduceProd", "ave": "ReduceMean"}[mode]
    return graph.node(reduce, [y, graph.ints([1])], keepdims=0)
