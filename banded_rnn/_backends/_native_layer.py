"""One layer's recurrence on the native CPU kernel, behind ``jax.ffi``.

One call of :func:`recurrence` runs one layer over a whole chunk: per step and
row (sequence, band), ``bias + x_t @ kernel + h @ recurrent_kernel``, the gate
maths and the state update, rows split over threads with no per-step
synchronisation. Its gradient is a second kernel that walks time backwards
(``jax.custom_vjp``), block of steps by block, and sums each block's weight
gradients ``[x, h]^T @ dgates`` with its own GEMM: the gate gradients never
leave a buffer it reuses. It computes the input's and the weights' gradients
only when they are differentiated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .._state import ROW_AXES
from ._native import BACKWARD, FORWARD, FORWARD_TRAIN, require


def _empty(x: jax.Array | None, dtype: Any = jnp.float32) -> jax.Array:
    """``x``, or an empty array of ``dtype`` that tells the kernel there is none."""
    return jnp.zeros((0,), dtype) if x is None else x


def _ffi(name: str, results: tuple[jax.ShapeDtypeStruct, ...], *args: jax.Array, **attributes):
    require()
    # broadcast_all: under vmap every argument gets the batch axis in front,
    # and the kernel runs each batch entry with its own weights ("groups").
    return jax.ffi.ffi_call(name, results, vmap_method="broadcast_all")(*args, **attributes)


def _forward(
    x,
    kernel,
    recurrent,
    bias,
    h0,
    c0,
    valid,
    dropmask,
    packed=None,
    *,
    train: bool,
    batch_major: bool = False,
):
    hs = jax.ShapeDtypeStruct((*x.shape[:-1], h0.shape[-1]), jnp.float32)
    state = jax.ShapeDtypeStruct(c0.shape, jnp.float32)
    args = (x, kernel, recurrent, bias, h0, c0, _empty(valid, jnp.bool_), _empty(dropmask))
    if train:
        acts = jax.ShapeDtypeStruct((*hs.shape[:-1], 4 * hs.shape[-1]), jnp.float32)
        return _ffi(FORWARD_TRAIN, (hs, hs, acts), *args)
    if batch_major:
        hs = jax.ShapeDtypeStruct((*x.shape[1:-1], x.shape[0], h0.shape[-1]), jnp.float32)
    return _ffi(FORWARD, (hs, state), *args, _empty(packed), batch_major=batch_major)


def recurrence(x, kernel, recurrent, bias, h0, c0, valid, dropmask, packed, *, batch_major=False):
    """One LSTM layer over a chunk, on the CPU kernel.

    Args:
      x: ``[time, rows..., features]`` float32 (``time >= 1``).
      kernel, recurrent, bias: ``[features, 4u]``, ``[u, 4u]``, ``[4u]`` float32.
      h0, c0: ``[rows..., u]`` float32, the state before the chunk.
      valid: ``[time, rows...]`` booleans or None: a false step leaves the row's state as it was.
      dropmask: ``[rows..., u]`` float32 or None: multiplies ``h`` before the recurrent kernel.
      packed: None, or the same weights as :func:`pack_forward` lays them out
        (the forward pass without differentiation reads them instead of
        packing; the differentiated one packs its own, and so does a call
        whose instruction set has another vector width than they were laid
        out for).
      batch_major: return ``hs`` as ``[rows..., time, u]``, the layout a model
        returns. Without differentiation the kernel writes it so; the
        differentiated forward stays time-major and transposes.

    Returns:
      ``(hs, c_final)``: the carried ``h`` after every step ``[time, rows..., u]``
      (held, not zeroed, at invalid steps) and the final ``c`` ``[rows..., u]``.
    """
    return _recurrence(batch_major, x, kernel, recurrent, bias, h0, c0, valid, dropmask, packed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(batch_major, *arrays):
    return _forward(*arrays, train=False, batch_major=batch_major)


def _recurrence_fwd(batch_major, x, kernel, recurrent, bias, h0, c0, valid, dropmask, packed):
    # symbolic_zeros: each argument comes with whether it is differentiated,
    # so the backward kernel computes dx and the weight gradients only when
    # they are wanted (the data a first layer reads has no gradient).
    wanted = (x.perturbed, kernel.perturbed or recurrent.perturbed or bias.perturbed)
    primals = (x, kernel, recurrent, bias, h0, c0, valid, dropmask)
    x, kernel, recurrent, bias, h0, c0, valid, dropmask = (
        None if a is None else a.value for a in primals
    )
    hs, cs, acts = _forward(x, kernel, recurrent, bias, h0, c0, valid, dropmask, train=True)
    residuals = (x, kernel, recurrent, h0, c0, valid, dropmask, hs, cs, acts)
    return (jnp.moveaxis(hs, 0, -2) if batch_major else hs, cs[-1]), (wanted, residuals)


def _dense(cotangent, like: jax.Array) -> jax.Array:
    """A cotangent as an array: zeros for a symbolic zero."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(like.shape, like.dtype)
    return cotangent


def _recurrence_bwd(batch_major, wanted_residuals, cotangents):
    (want_x, want_weights), residuals = wanted_residuals
    x, kernel, recurrent, h0, c0, valid, dropmask, hs, cs, acts = residuals
    d_hs, d_c_final = cotangents[0], _dense(cotangents[1], c0)
    if isinstance(d_hs, jax.custom_derivatives.SymbolicZero):
        d_hs = jnp.zeros(hs.shape, hs.dtype)
    elif batch_major:
        d_hs = jnp.moveaxis(d_hs, -2, 0)
    # The gate gradients stay inside the kernel: it returns dx and the weight
    # gradients, [x, h_in]^T @ dgates summed over steps and rows by its own
    # GEMM (benchmarks/NOTES.md entry 16). An empty result is not computed.
    f32 = jnp.float32
    none = jax.ShapeDtypeStruct((0,), f32)
    d_x, d_kernel, d_recurrent, d_bias, dh0, dc0 = _ffi(
        BACKWARD,
        (
            jax.ShapeDtypeStruct(x.shape, f32) if want_x else none,
            jax.ShapeDtypeStruct(kernel.shape, f32) if want_weights else none,
            jax.ShapeDtypeStruct(recurrent.shape, f32) if want_weights else none,
            jax.ShapeDtypeStruct(recurrent.shape[-1:], f32) if want_weights else none,
            jax.ShapeDtypeStruct(h0.shape, f32),
            jax.ShapeDtypeStruct(c0.shape, f32),
        ),
        recurrent,
        kernel,
        x,
        h0,
        hs,
        c0,
        _empty(valid, jnp.bool_),
        _empty(dropmask),
        cs,
        acts,
        d_hs,
        d_c_final,
    )
    if not want_x:
        d_x = None
    if not want_weights:
        d_kernel = d_recurrent = d_bias = None
    return d_x, d_kernel, d_recurrent, d_bias, dh0, dc0, None, None, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd, symbolic_zeros=True)


def _row_split(inputs: jax.Array) -> tuple[PartitionSpec, bool] | None:
    """How the mesh this is traced under splits the rows of ``inputs [time,
    batch, bands, features]``, and whether its axes are explicit; None if
    it does not (no mesh, one device, or a split XLA must sort out).

    XLA cannot partition a custom call: under a mesh it would gather every
    row onto every device and run them all there. So the kernel runs in
    ``shard_map`` instead, each device on its own rows: split as the inputs'
    type says under explicit axes, and under automatic ones, as
    :data:`ROW_AXES` name them (``make_train_step(mesh=...)`` traces under
    its mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    kinds = set(mesh.axis_types)
    if kinds == {jax.sharding.AxisType.Explicit}:
        spec = tuple(jax.typeof(inputs).sharding.spec)
        spec += (None,) * (inputs.ndim - len(spec))
        if spec[0] is not None or spec[3] is not None or spec[1:3] == (None, None):
            return None
        return PartitionSpec(*spec[1:3]), True
    if kinds != {jax.sharding.AxisType.Auto} or not set(mesh.axis_names) <= set(ROW_AXES):
        return None
    split = tuple(name if name in mesh.axis_names else None for name in ROW_AXES)
    for size, name in zip(inputs.shape[1:3], split, strict=True):
        if name is not None and size % mesh.shape[name]:
            return None  # not evenly split: every device runs every row
    return PartitionSpec(*split), False


def _split_over_rows(function, rows: PartitionSpec, explicit: bool, batch_major: bool):
    """``function(x, kernel, recurrent, bias, h0, c0, valid, dropmask, packed)``
    in ``shard_map``: rows split by ``rows``, the weights on every device;
    ``function``'s outputs are time-major, or batch-major with ``batch_major``."""
    time_rows, replicated = PartitionSpec(None, *rows), PartitionSpec()

    def call(*args):
        specs = (time_rows, replicated, replicated, replicated, rows, rows, time_rows, rows)
        specs += (replicated,)
        specs = tuple(None if a is None else s for a, s in zip(args, specs, strict=True))
        if explicit:  # explicit axes: the arguments must already be split so
            args = tuple(
                a if a is None else jax.sharding.reshard(a, s)
                for a, s in zip(args, specs, strict=True)
            )
        outputs = rows if batch_major else time_rows
        return jax.shard_map(function, in_specs=specs, out_specs=(outputs, rows), check_vma=False)(
            *args
        )

    return call


def run_layer(weights, recurrent_mask, carry, xs, packed=None, batch_major=False):
    """``_scan_layer``'s contract on the kernel: one layer over ``xs = (inputs
    [time, batch, bands, features], valid [time, batch, bands] or None)`` from
    ``carry = (h, c)``; returns ``((h, c), outputs)``, an invalid step's output
    being the hidden state it leaves unchanged. ``packed``: the weights as
    :func:`pack_forward` lays them out, or None. ``batch_major``: the outputs
    as ``[batch, bands, time, units]`` (a model's last layer: the kernel
    writes them so, and no transpose follows)."""
    require()
    inputs, valid = xs
    hidden, cell = carry
    if inputs.shape[0] == 0:
        outputs = jnp.zeros((*inputs.shape[:-1], hidden.shape[-1]), hidden.dtype)
        return carry, jnp.moveaxis(outputs, 0, 2) if batch_major else outputs
    kernel, recurrent, bias = weights
    run = functools.partial(recurrence, batch_major=batch_major)
    split = _row_split(inputs)
    if split is not None:
        run = _split_over_rows(run, *split, batch_major)
    hs, cell = run(inputs, kernel, recurrent, bias, hidden, cell, valid, recurrent_mask, packed)
    return (hs[:, :, -1] if batch_major else hs[-1], cell), hs
