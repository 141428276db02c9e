"""``export_onnx``: one streaming call of a model as an ONNX file, its state in and out.

The call is traced once with ``jax.make_jaxpr`` over a symbolic ``batch`` and
``time``, while ``flax.linen.intercept_methods`` replaces every
``BandedLSTM.__call__`` by one primitive that records the layer (its options
and weights). :mod:`._onnx_lstm` turns each such record into ONNX ``LSTM``
operators, and :mod:`._onnx_graph` the rest of the jaxpr into ONNX operators
of our own mapping. ``onnx`` is imported only when exporting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jax_core

from .. import _validate
from .._banded import BandedLSTM, _compute_dtype
from .._state import LSTMState
from ._file import write_atomically
from ._step import (
    StreamSpec,
    check_model,
    stream_spec,
    takes_keyword,
    without_packed_weights,
)

if TYPE_CHECKING:
    import onnx

OPSET = 18
"""The ONNX opset the files use (reductions take their axes as inputs, ``Split``
its ``num_outputs``): ONNX Runtime 1.14 and later run it."""

_lstm_p = jax_core.Primitive("banded_lstm_onnx")
_lstm_p.multiple_results = True


@_lstm_p.def_abstract_eval
def _lstm_shapes(inputs, *state, call, units, output_units, leaves):
    """The final state's leaves ``[batch, bands, units]``, then the outputs."""
    batch, bands, time, _ = inputs.shape
    leaf = jax.core.ShapedArray((batch, bands, units), np.float32)
    return [leaf] * leaves + [jax.core.ShapedArray((batch, bands, time, output_units), np.float32)]


class _Recorder:
    """An interceptor for ``flax.linen.intercept_methods``: each
    ``BandedLSTM.__call__`` is checked, recorded in :attr:`calls` and replaced
    by one ``banded_lstm_onnx`` primitive; every other method runs as it is.
    With ``shapes_only`` (while ``stream_spec`` finds the state's shapes,
    with the variables traced), only what the shapes need is checked."""

    def __init__(self, shapes_only: bool = False) -> None:
        self.calls: list[Any] = []
        self.shapes_only = shapes_only

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if (
            not isinstance(module, BandedLSTM)
            or context.method_name != "__call__"
            or module.is_initializing()  # making variables (the checks of stream_spec)
        ):
            return next_fun(*args, **kwargs)
        return self._record(module, *args, **kwargs)

    def _record(
        self,
        module: BandedLSTM,
        state: Any,
        inputs: Any,
        *,
        seq_lengths: Any = None,
        mask: Any = None,
        deterministic: bool = True,
    ) -> tuple[tuple[LSTMState, ...], jax.Array]:
        layer = "/".join(module.path) or "the model's root"
        _refuse(module, layer, seq_lengths=seq_lengths, mask=mask, deterministic=deterministic)
        features = _validate.input_features(module.variables)
        inputs = _validate.check_inputs(inputs, features=features, abstract=True)
        batch, bands, _, _ = inputs.shape
        count = module.num_layers * module.num_directions
        leaves = []
        if state is not None:
            shape = (batch, bands, module.units)
            state = _validate.check_state(
                state, module.num_layers, shape, directions=module.num_directions
            )
            leaves = [leaf.astype(np.float32) for layer_state in state for leaf in layer_state]
        call = len(self.calls)
        if not self.shapes_only:
            self.calls.append(_lstm_call(module, layer, inputs, has_state=state is not None))
        outputs = _lstm_p.bind(
            inputs.astype(np.float32),  # as the model casts them
            *leaves,
            call=call,
            units=module.units,
            output_units=module.output_units,
            leaves=2 * count,
        )
        final = tuple(LSTMState(*outputs[i : i + 2]) for i in range(0, 2 * count, 2))
        return final, outputs[-1]


def _lstm_call(module: BandedLSTM, layer: str, inputs: Any, has_state: bool) -> Any:
    """The ``LSTMCall`` of a ``BandedLSTM`` called on ``inputs``, its variables
    concrete; refuses a computation other than float32 and activations ONNX's
    ``LSTM`` lacks."""
    from ._onnx_lstm import LSTMCall, onnx_activation

    dtype = _compute_dtype(inputs.dtype, module.param_dtype)
    if dtype != np.float32:
        raise TypeError(
            f"dtype: ONNX export runs BandedLSTM in float32; the BandedLSTM at {layer} "
            f"computes in {np.dtype(dtype).name} (inputs {np.dtype(inputs.dtype).name}, "
            f"param_dtype {np.dtype(module.param_dtype).name})"
        )
    return LSTMCall(
        layer=layer,
        units=module.units,
        num_layers=module.num_layers,
        bands=inputs.shape[1],
        reverse=module.reverse,
        keep_order=module.keep_order,
        bidirectional=module.bidirectional,
        merge_mode=module.merge_mode,
        activations=(
            onnx_activation(module.activation, "activation", layer),
            onnx_activation(module.recurrent_activation, "recurrent_activation", layer),
        ),
        params=jax.tree.map(np.asarray, _validate.plain_dicts(module.variables["params"])),
        has_state=has_state,
    )


def _refuse(module: BandedLSTM, layer: str, **call: Any) -> None:
    """``ValueError`` naming the first argument or option of a ``BandedLSTM``
    call that ONNX's ``LSTM`` operator cannot express."""
    for name in ("seq_lengths", "mask"):
        if call[name] is not None:
            raise ValueError(
                f"{name}: the BandedLSTM at {layer} is called with {name}, which export_onnx "
                "does not export (a streamed call runs every step of its chunk)"
            )
    if not call["deterministic"] and (module.dropout or module.recurrent_dropout):
        raise ValueError(
            f"dropout: the BandedLSTM at {layer} is called with deterministic=False and "
            f"dropout={module.dropout}, recurrent_dropout={module.recurrent_dropout}; "
            "export_onnx exports inference, with dropout off"
        )
    if module.time_major:
        raise ValueError(
            f"time_major: the BandedLSTM at {layer} has time_major=True; export_onnx takes "
            "models whose BandedLSTMs read [batch, bands, time, features]"
        )


def _leaf_names(state: Any, prefix: str) -> list[str]:
    """``state.0.hidden``, ``state.0.cell``, ...: each leaf's path, in ``jax.tree`` order."""
    paths = jax.tree_util.tree_flatten_with_path(state)[0]
    keys = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in paths]
    return [f"{prefix}.{key}" if key else prefix for key in keys]


def export_onnx(
    model: nn.Module,
    variables: Any,
    path: str | os.PathLike,
    *,
    num_bands: int,
    features: int | None = None,
) -> onnx.ModelProto:
    """Writes one streaming call of ``model`` to ``path`` as an ONNX model.

    The model runs in any ONNX runtime (ONNX Runtime from Python, C, C++,
    C#, Java, ...): no JAX, no Python. Like :func:`export_stream_step`, the
    variables are baked in, and the state goes in and comes out, so the caller
    keeps it between calls. Inputs and outputs, in this order:

    * inputs ``chunk [batch, bands, time, features]`` float32, then every leaf
      of the state, ``state.<path>`` in ``jax.tree`` order (a ``BandedLSTM``'s:
      ``state.0.hidden``, ``state.0.cell``, ``state.1.hidden``, ..., each
      ``[batch, bands, units]``);
    * outputs ``outputs [batch, bands, time, ...]``, then the new state,
      ``final_state.<path>``, leaf for leaf as the inputs.

    ``batch`` and ``time`` are dynamic (one file runs any batch size and
    chunk length); ``bands`` and ``features`` are fixed. Pass zeros as the
    state to start or reset a stream. Each ``BandedLSTM`` layer becomes ONNX's
    ``LSTM`` operator, so runtimes use their fused kernels (their results
    agree with ours to about 1e-6, not bit for bit); the layers around them
    become ONNX operators of our own mapping of JAX's primitives.

    A bidirectional or reversed ``BandedLSTM`` is exported too, but its state
    threads from a sequence's end: run the file on whole sequences (as with
    ``apply``, not as a ``Stream``). Refused, with a ``ValueError`` or
    ``TypeError`` naming the argument and the layer: activations ONNX's
    ``LSTM`` lacks (tanh, sigmoid, relu, linear, hard_sigmoid, softsign,
    softplus, elu and leaky_relu export), ``seq_lengths`` or ``mask`` passed
    to a ``BandedLSTM``, dropout in training, ``time_major``, a computation
    other than float32, and any JAX primitive with no ONNX mapping (named).

    Args:
      model: the ``BandedLSTM``, or a Flax module with its calling convention
        (see :class:`Stream`): layers before and after the LSTMs are exported.
      variables: its variables, baked in.
      path: the ``.onnx`` file to write.
      num_bands: the ``bands`` of every chunk, fixed in the file.
      features: the chunk's last axis; read from a ``BandedLSTM``'s
        variables, required for other models.

    Returns:
      The ``onnx.ModelProto`` written (checked with ``onnx.checker``).

    >>> import os, tempfile, jax, numpy as np, onnxruntime
    >>> from banded_rnn import BandedLSTM
    >>> model = BandedLSTM(units=8)
    >>> variables = model.init(jax.random.key(0), None, np.zeros((1, 3, 1, 4), np.float32))
    >>> directory = tempfile.TemporaryDirectory()
    >>> path = os.path.join(directory.name, "model.onnx")
    >>> _ = export_onnx(model, variables, path, num_bands=3)
    >>> session = onnxruntime.InferenceSession(path)     # needs no JAX, elsewhere
    >>> [i.name for i in session.get_inputs()]
    ['chunk', 'state.0.hidden', 'state.0.cell']
    >>> [o.name for o in session.get_outputs()]
    ['outputs', 'final_state.0.hidden', 'final_state.0.cell']
    >>> chunk = np.ones((2, 3, 5, 4), np.float32)      # [batch, bands, time, features]
    >>> zeros = np.zeros((2, 3, 8), np.float32)        # [batch, bands, units]: a new stream
    >>> y, hidden, cell = session.run(None, {"chunk": chunk, "state.0.hidden": zeros,
    ...                                      "state.0.cell": zeros})
    >>> y.shape, hidden.shape                          # [batch, bands, time, units]
    ((2, 3, 5, 8), (2, 3, 8))
    >>> directory.cleanup()
    """
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            "export_onnx needs the onnx package: pip install 'banded_rnn[onnx]'"
        ) from error

    check_model(model)
    variables = jax.device_put(without_packed_weights(variables))
    with nn.intercept_methods(_Recorder(shapes_only=True)):  # refuses no backward BandedLSTM
        spec = stream_spec(model, variables, 1, num_bands, np.float32, features)
    recorder = _Recorder()
    closed = _trace(model, variables, spec, recorder)
    proto = _to_onnx(closed, spec, recorder.calls)
    onnx.checker.check_model(proto, full_check=True)
    write_atomically(path, lambda file: onnx.save(proto, file))
    return proto


def _trace(model: nn.Module, variables: Any, spec: StreamSpec, recorder: _Recorder) -> Any:
    """The closed jaxpr of ``(chunk, *state leaves) -> (outputs, *final state
    leaves)`` over a symbolic ``batch`` and ``time``, every ``BandedLSTM``
    call one primitive recorded by ``recorder``; the variables are its constants."""
    keywords = {"deterministic": True} if takes_keyword(model, "deterministic") else {}
    treedef = jax.tree.structure(spec.state)

    def call(chunk, *leaves):
        with nn.intercept_methods(recorder):
            state, outputs = model.apply(
                variables, jax.tree.unflatten(treedef, leaves), chunk, **keywords
            )
        return (outputs, *jax.tree.leaves(state))

    batch, time = jax.export.symbolic_shape("batch, time")
    chunk = jax.ShapeDtypeStruct((batch, spec.num_bands, time, spec.features), np.float32)
    leaves = [
        jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype)
        for leaf in jax.tree.leaves(spec.state)
    ]
    return jax.make_jaxpr(call)(chunk, *leaves)


def _to_onnx(closed: Any, spec: StreamSpec, calls: list[Any]) -> onnx.ModelProto:
    """The ONNX model of a jaxpr from :func:`_trace`, its inputs and outputs named."""
    from ._onnx_graph import Converter, Graph
    from ._onnx_lstm import lstm_nodes

    graph = Graph()
    dims = {  # the symbolic dimensions, read from the chunk's shape
        "batch": graph.node("Shape", ["chunk"], start=0, end=1),
        "time": graph.node("Shape", ["chunk"], start=2, end=3),
    }

    def lstm_rule(cx: Converter, eqn: Any, inputs: list[Any]) -> list[str]:
        names = [cx.name(v) for v in inputs]
        return lstm_nodes(cx.graph, calls[eqn.params["call"]], names[0], names[1:])

    converter = Converter(graph, dims, {_lstm_p.name: lstm_rule})
    input_names = ["chunk", *_leaf_names(spec.state, "state")]
    output_names = ["outputs", *_leaf_names(spec.state, "final_state")]
    values = converter.run(closed.jaxpr, closed.consts, input_names)
    for value, name in zip(values, output_names, strict=True):
        graph.output(converter.name(value), name)
    return graph.model(
        list(zip(input_names, [v.aval for v in closed.jaxpr.invars], strict=True)),
        list(zip(output_names, [v.aval for v in closed.jaxpr.outvars], strict=True)),
        OPSET,
    )
