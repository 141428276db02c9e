"""The rules that map JAX's primitives to ONNX operators, one function each.

A rule takes the converter (``_onnx_graph.Converter``: its ``graph`` to add
nodes to, ``name`` to turn a constant into an initialiser, ``shape`` for
shapes with symbolic dimensions), the jaxpr equation and the values of its
inputs, and returns the value or values of its outputs. :data:`RULES` holds
them by primitive name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from onnx import helper

if TYPE_CHECKING:
    from ._onnx_graph import Converter

Value = str | np.ndarray
"""A jaxpr variable's value while converting: an ONNX name, or a constant."""


def is_static(dim: Any) -> bool:
    """Whether ``dim`` is a known size (not a symbolic dimension)."""
    return isinstance(dim, int | np.integer)


def is_static_shape(shape: Sequence[Any]) -> bool:
    """Whether every dimension of ``shape`` is known."""
    return all(is_static(d) for d in shape)


def source(eqn: Any) -> str:
    """Where ``eqn`` was traced from, for messages."""
    try:
        return jax._src.source_info_util.summarize(eqn.source_info)
    except Exception:  # only a hint in a message
        return "the model"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a symbolic comparison may be inconclusive
        return False


# --- rules: each maps one primitive, given the converter, the equation and its inputs ---


def _elementwise(op: str) -> Callable:
    def rule(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
        return cx.graph.node(op, [cx.name(v) for v in inputs])

    return rule


def _constant_like(cx: Converter, eqn: Any, value: float) -> str:
    return cx.graph.const(np.asarray(value, eqn.outvars[0].aval.dtype))


def _log1p(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    shifted = cx.graph.node("Add", [cx.name(inputs[0]), _constant_like(cx, eqn, 1.0)])
    return cx.graph.node("Log", [shifted])


def _expm1(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    exp = cx.graph.node("Exp", [cx.name(inputs[0])])
    return cx.graph.node("Sub", [exp, _constant_like(cx, eqn, 1.0)])


def _exp2(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    return cx.graph.node("Pow", [_constant_like(cx, eqn, 2.0), cx.name(inputs[0])])


def _identity(cx: Converter, eqn: Any, inputs: list[Value]) -> Value:
    return inputs[0]


def _not_equal(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    return cx.graph.node("Not", [_elementwise("Equal")(cx, eqn, inputs)])


def _rsqrt(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    return cx.graph.node("Reciprocal", [cx.graph.node("Sqrt", [cx.name(inputs[0])])])


def _square(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    x = cx.name(inputs[0])
    return cx.graph.node("Mul", [x, x])


def _integer_pow(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    x, y = cx.name(inputs[0]), eqn.params["y"]
    if y == 2:
        return cx.graph.node("Mul", [x, x])
    return cx.graph.node("Pow", [x, _constant_like(cx, eqn, y)])


def _convert_element_type(cx: Converter, eqn: Any, inputs: list[Value]) -> Value:
    dtype = np.dtype(eqn.params["new_dtype"])
    if dtype == eqn.invars[0].aval.dtype:
        return inputs[0]
    to = helper.np_dtype_to_tensor_dtype(dtype)
    return cx.graph.node("Cast", [cx.name(inputs[0])], to=to)


def _select_n(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    which, *cases = inputs
    if len(cases) != 2 or eqn.invars[0].aval.dtype != np.bool_:
        raise ValueError(
            f"model: select_n with {len(cases)} cases or a non-boolean selector (from "
            f"{source(eqn)}) has no ONNX mapping; jnp.where with a boolean condition has"
        )
    return cx.graph.node("Where", [cx.name(which), cx.name(cases[1]), cx.name(cases[0])])


def _clamp(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    low, x, high = (cx.name(v) for v in inputs)
    return cx.graph.node("Min", [cx.graph.node("Max", [x, low]), high])


def _dot_general(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (cx.name(v) for v in inputs)
    lhs_rank, rhs_rank = (len(v.aval.shape) for v in eqn.invars)
    plain = (
        not lhs_batch
        and rhs_rank == 2
        and tuple(lhs_contract) == (lhs_rank - 1,)
        and tuple(rhs_contract) == (0,)
    )
    if plain:  # x @ kernel, a dense layer: runtimes' GEMM
        return cx.graph.node("MatMul", [lhs, rhs])
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs_labels = [next(letters) for _ in range(lhs_rank)]
    rhs_labels = [next(letters) for _ in range(rhs_rank)]
    shared = zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch), strict=True)
    for i, j in shared:
        rhs_labels[j] = lhs_labels[i]
    kept_lhs = [lhs_labels[i] for i in range(lhs_rank) if i not in (*lhs_contract, *lhs_batch)]
    kept_rhs = [rhs_labels[j] for j in range(rhs_rank) if j not in (*rhs_contract, *rhs_batch)]
    out = [lhs_labels[i] for i in lhs_batch] + kept_lhs + kept_rhs
    equation = f"{''.join(lhs_labels)},{''.join(rhs_labels)}->{''.join(out)}"
    return cx.graph.node("Einsum", [lhs, rhs], equation=equation)


def _reshape(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    if eqn.params.get("dimensions") is not None:
        raise ValueError(f"model: reshape with dimensions (from {source(eqn)}) is not mapped")
    shape = cx.shape(eqn.params["new_sizes"], reshape=True)
    return cx.graph.node("Reshape", [cx.name(inputs[0]), shape])


def _squeeze(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    axes = cx.graph.ints(eqn.params["dimensions"])
    return cx.graph.node("Squeeze", [cx.name(inputs[0]), axes])


def _broadcast_in_dim(cx: Converter, eqn: Any, inputs: list[Value]) -> Value:
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    x = cx.name(inputs[0])
    operand = eqn.invars[0].aval.shape
    new_axes = [i for i in range(len(shape)) if i not in kept]
    if new_axes:
        x = cx.graph.node("Unsqueeze", [x, cx.graph.ints(new_axes)])
    # Expand broadcasts: a dimension the operand already has may stay 1.
    widths = [1] * len(shape)
    for axis, size in zip(kept, operand, strict=True):
        widths[axis] = size
    target = [1 if _same(w, s) else s for w, s in zip(widths, shape, strict=True)]
    if all(is_static(d) and d == 1 for d in target):
        return x
    return cx.graph.node("Expand", [x, cx.shape(target)])


def _transpose(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    return cx.graph.node("Transpose", [cx.name(inputs[0])], perm=list(eqn.params["permutation"]))


def _concatenate(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    names = [cx.name(v) for v in inputs]
    return cx.graph.node("Concat", names, axis=eqn.params["dimension"])


def _split(cx: Converter, eqn: Any, inputs: list[Value]) -> list[str]:
    sizes = eqn.params["sizes"]
    if not is_static_shape(sizes):
        raise ValueError(f"model: split of a symbolic axis (from {source(eqn)}) is not mapped")
    return cx.graph.node(
        "Split",
        [cx.name(inputs[0]), cx.graph.ints(sizes)],
        outputs=len(sizes),
        axis=eqn.params["axis"],
    )


def _slice(cx: Converter, eqn: Any, inputs: list[Value]) -> Value:
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    shape = eqn.invars[0].aval.shape
    axes = [
        i
        for i, (start, limit, size) in enumerate(zip(starts, limits, shape, strict=True))
        if start != 0 or strides[i] != 1 or not _same(limit, size)
    ]
    if not axes:
        return inputs[0]
    if not is_static_shape([d for i in axes for d in (starts[i], limits[i])]):
        raise ValueError(f"model: slicing a symbolic axis (from {source(eqn)}) is not mapped")
    bounds = [[p[i] for i in axes] for p in (starts, limits)]
    return cx.graph.node(
        "Slice",
        [cx.name(inputs[0]), *(cx.graph.ints(b) for b in bounds), cx.graph.ints(axes)]
        + [cx.graph.ints([strides[i] for i in axes])],
    )


def _gather(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
    """The gather ``x[..., a:b]`` and ``x[..., i]`` make when a shape is
    symbolic: constant starts, whole slices of the other axes, as ``Slice``
    (and ``Squeeze`` for an integer index)."""
    operand, starts = inputs
    numbers, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    axes, collapsed = tuple(numbers.start_index_map), tuple(numbers.collapsed_slice_dims)
    whole = [i for i in range(len(shape)) if i not in axes]
    if not (
        isinstance(starts, np.ndarray)
        and starts.shape == (len(axes),)
        and not numbers.operand_batching_dims
        and tuple(numbers.offset_dims) == tuple(range(len(shape) - len(collapsed)))
        and all(_same(sizes[i], shape[i]) for i in whole)
        and is_static_shape([shape[i] for i in axes])
    ):
        raise ValueError(
            f"model: a gather (from {source(eqn)}) other than a slice at constant indices "
            "has no ONNX mapping in banded_rnn.export_onnx"
        )
    begin = [int(np.clip(s, 0, shape[a] - sizes[a])) for s, a in zip(starts, axes, strict=True)]
    end = [b + sizes[a] for b, a in zip(begin, axes, strict=True)]
    x = cx.graph.node(
        "Slice", [cx.name(operand), cx.graph.ints(begin), cx.graph.ints(end), cx.graph.ints(axes)]
    )
    return cx.graph.node("Squeeze", [x, cx.graph.ints(collapsed)]) if collapsed else x


def _reduce(op: str) -> Callable:
    def rule(cx: Converter, eqn: Any, inputs: list[Value]) -> str:
        axes = cx.graph.ints(eqn.params["axes"])
        return cx.graph.node(op, [cx.name(inputs[0]), axes], keepdims=0)

    return rule


RULES: dict[str, Callable[[Converter, Any, list[Value]], Any]] = {
    **{
        name: _elementwise(op)
        for name, op in {
            "add": "Add",
            "sub": "Sub",
            "mul": "Mul",
            "div": "Div",
            "max": "Max",
            "min": "Min",
            "pow": "Pow",
            "neg": "Neg",
            "abs": "Abs",
            "sign": "Sign",
            "exp": "Exp",
            "log": "Log",
            "tanh": "Tanh",
            "logistic": "Sigmoid",
            "sqrt": "Sqrt",
            "erf": "Erf",
            "sin": "Sin",
            "cos": "Cos",
            "floor": "Floor",
            "ceil": "Ceil",
            "eq": "Equal",
            "lt": "Less",
            "le": "LessOrEqual",
            "gt": "Greater",
            "ge": "GreaterOrEqual",
            "and": "And",
            "or": "Or",
            "not": "Not",
        }.items()
    },
    "ne": _not_equal,
    "rsqrt": _rsqrt,
    "square": _square,
    "integer_pow": _integer_pow,
    "log1p": _log1p,
    "expm1": _expm1,
    "exp2": _exp2,
    "stop_gradient": _identity,
    "copy": _identity,
    "copy_p": _identity,
    "convert_element_type": _convert_element_type,
    "select_n": _select_n,
    "clamp": _clamp,
    "dot_general": _dot_general,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose,
    "concatenate": _concatenate,
    "split": _split,
    "slice": _slice,
    "gather": _gather,
    "reduce_sum": _reduce("ReduceSum"),
    "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "reduce_prod": _reduce("ReduceProd"),
}
"""The primitives ``Converter.run`` maps, by name."""
