"""A jaxpr as an ONNX graph: our own mapping of JAX's primitives to ONNX operators.

:class:`Graph` collects the nodes and the constants; :func:`convert` walks a
jaxpr, folds what depends on constants alone (the parameters' casts and
reshapes) into constants, inlines the calls it holds (``jit``, ``custom_jvp``,
...), and maps every other primitive with a rule of :data:`._onnx_rules.RULES`. A
primitive with no rule is refused by name. Dimensions may be symbolic (the
``batch`` and ``time`` of ``jax.export.symbolic_shape``); a shape that needs
them is computed in the graph from the inputs' shapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from jax.extend import core as jax_core
from onnx import helper, numpy_helper

from ._onnx_rules import RULES, Value, is_static, is_static_shape, source


class Graph:
    """The nodes and initialisers of an ONNX graph being built, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = itertools.count()
        self._small: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._outputs: dict[str, str] = {}

    def fresh(self, hint: str = "v") -> str:
        return f"{hint}_{next(self._counter)}"

    def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> Any:
        """Adds one ``op`` node (attributes that are None left out); returns
        its output's name, or a list of ``outputs`` names."""
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        attrs = {key: value for key, value in attrs.items() if value is not None}
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any) -> str:
        """An initialiser holding ``value``; small ones are shared."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 16 else None
        if key is not None and key in self._small:
            return self._small[key]
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(value, name))
        if key is not None:
            self._small[key] = name
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A constant int64 vector (shapes, axes, indices)."""
        return self.const(np.asarray(values, np.int64))

    def output(self, value: str, name: str) -> None:
        """Makes ``value`` a graph output called ``name``: the node computing
        it is renamed; a graph input, a constant or a value already output
        goes through an ``Identity``."""
        producers = [node for node in self.nodes if value in node.output]
        if not producers:
            source = self._outputs.get(value, value)
            self.nodes.append(helper.make_node("Identity", [source], [name]))
            return
        for node in self.nodes:
            for field in (node.input, node.output):
                for i, x in enumerate(field):
                    if x == value:
                        field[i] = name
        self._outputs[value] = name

    def model(
        self, inputs: Sequence[tuple[str, Any]], outputs: Sequence[tuple[str, Any]], opset: int
    ) -> onnx.ModelProto:
        """The model of the graph's inputs and outputs (names and JAX avals);
        nodes and constants no output needs are left out."""
        needed = {name for name, _ in outputs}
        kept = []
        for node in reversed(self.nodes):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(node.input)
        graph = helper.make_graph(
            kept[::-1],
            "banded_rnn_stream_step",
            [_value_info(name, aval) for name, aval in inputs],
            [_value_info(name, aval) for name, aval in outputs],
            [tensor for tensor in self.initializers if tensor.name in needed],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="banded_rnn"
        )


def _value_info(name: str, aval: Any) -> onnx.ValueInfoProto:
    """A graph input's or output's type: symbolic dimensions by name (``batch``, ``time``)."""
    shape = [int(d) if is_static(d) else str(d) for d in aval.shape]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(aval.dtype), shape)


class _Dim:
    """A dimension computed in the graph, an int64 vector ``[1]``: symbolic
    dimensions evaluate to these (``_DimExpr._evaluate`` adds and multiplies them)."""

    __array_ufunc__ = None  # NumPy integers defer to the reflected operators

    def __init__(self, graph: Graph, name: str) -> None:
        self.graph, self.name = graph, name

    def _binary(self, op: str, other: Any, reflected: bool = False) -> _Dim:
        other = other.name if isinstance(other, _Dim) else self.graph.ints([int(other)])
        pair = [other, self.name] if reflected else [self.name, other]
        return _Dim(self.graph, self.graph.node(op, pair))

    def __add__(self, other: Any) -> _Dim:
        return self._binary("Add", other)

    def __radd__(self, other: Any) -> _Dim:
        return self._binary("Add", other, True)

    def __mul__(self, other: Any) -> _Dim:
        return self._binary("Mul", other)

    def __rmul__(self, other: Any) -> _Dim:
        return self._binary("Mul", other, True)

    def __sub__(self, other: Any) -> _Dim:
        return self._binary("Sub", other)

    def __rsub__(self, other: Any) -> _Dim:
        return self._binary("Sub", other, True)

    def __divmod__(self, other: Any) -> tuple[_Dim, _Dim]:  # sizes are positive: Div floors
        return self._binary("Div", other), self._binary("Mod", other)


class Converter:
    """Converts jaxprs into ``graph``; ``dims`` names the int64 ``[1]`` value
    of each symbolic dimension, ``custom`` maps a primitive (by name) to a
    rule of its own (the ``BandedLSTM`` calls)."""

    def __init__(self, graph: Graph, dims: dict[str, str], custom: dict[str, Callable]) -> None:
        self.graph = graph
        self._dims = {name: _Dim(graph, value) for name, value in dims.items()}
        self._custom = custom

    def name(self, value: Value) -> str:
        """``value`` as an ONNX name: constants become initialisers."""
        return value if isinstance(value, str) else self.graph.const(value)

    def shape(self, dims: Sequence[Any], reshape: bool = False) -> str:
        """A shape as an int64 vector; symbolic dimensions are computed (for
        ``Reshape``, a single one is left to the operator as -1)."""
        symbolic = [i for i, d in enumerate(dims) if not is_static(d)]
        if not symbolic or (reshape and len(symbolic) == 1):
            return self.graph.ints([-1 if i in symbolic else int(d) for i, d in enumerate(dims)])
        parts = [self._dim(d) if i in symbolic else [int(d)] for i, d in enumerate(dims)]
        names = [p.name if isinstance(p, _Dim) else self.graph.ints(p) for p in parts]
        return self.graph.node("Concat", names, axis=0)

    def _dim(self, dim: Any) -> _Dim:
        value = dim._evaluate(self._dims)  # a polynomial of the symbolic dimensions
        return value if isinstance(value, _Dim) else _Dim(self.graph, self.graph.ints([value]))

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Value]) -> list[Value]:
        """The values of ``jaxpr``'s outputs given its constants and arguments."""
        env: dict[Any, Value] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value if isinstance(value, str) else np.asarray(value)
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value

        def read(atom: Any) -> Value:
            if isinstance(atom, jax_core.Literal):
                return np.asarray(atom.val, atom.aval.dtype)
            return env[atom]

        for eqn in jaxpr.eqns:
            outputs = self._equation(eqn, [read(atom) for atom in eqn.invars])
            for var, value in zip(eqn.outvars, outputs, strict=True):
                env[var] = value
        return [read(atom) for atom in jaxpr.outvars]

    def _equation(self, eqn: Any, inputs: list[Value]) -> list[Value]:
        name = eqn.primitive.name
        if name in self._custom:
            return self._custom[name](self, eqn, inputs)
        if all(isinstance(v, np.ndarray) for v in inputs) and all(
            is_static_shape(v.aval.shape) for v in eqn.outvars
        ):
            folded = eqn.primitive.bind(*inputs, **eqn.params)
            folded = folded if eqn.primitive.multiple_results else [folded]
            return [np.asarray(v) for v in folded]
        inner = _inner_jaxpr(eqn)
        if inner is not None:
            return self.run(inner.jaxpr, inner.consts, inputs)
        rule = RULES.get(name)
        if rule is None:
            raise ValueError(
                f"model: the primitive {name!r} (from {source(eqn)}) has no ONNX mapping in "
                f"banded_rnn.export_onnx; the mapped primitives are {sorted(RULES)}"
            )
        outputs = rule(self, eqn, inputs)
        return outputs if isinstance(outputs, list) else [outputs]


_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call")
_CALLS += ("remat", "checkpoint", "custom_vjp_call_jaxpr")


def _inner_jaxpr(eqn: Any) -> Any:
    """The closed jaxpr a call primitive runs, or None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, jax_core.ClosedJaxpr):
            return inner
        if isinstance(inner, jax_core.Jaxpr):
            return jax_core.ClosedJaxpr(inner, ())
    return None
