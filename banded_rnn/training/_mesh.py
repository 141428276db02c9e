"""Device meshes for data-parallel training: batch entries (and bands) split over devices."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._internal import ROW_AXES
from .._internal import validate as _validate

BATCH, BANDS = ROW_AXES  # the native kernel splits rows over axes of these names


def make_mesh(bands: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``devices`` (default: all) with the axes ``("batch", "bands")``.

    The batch axis gets ``len(devices) // bands`` devices and the bands axis
    ``bands``; with ``bands=1`` every device holds a slice of the batch and all
    the bands. Both axes are ``Auto``: the compiler places the communication.

    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'batch': 1, 'bands': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    bands = _validate.positive_int(bands, "bands")
    if len(devices) % bands:
        raise ValueError(
            f"bands: expected an integer >= 1 dividing the {len(devices)} devices; "
            f"received {bands!r}"
        )
    grid = np.array(devices, dtype=object).reshape(len(devices) // bands, bands)
    auto = jax.sharding.AxisType.Auto
    return Mesh(grid, (BATCH, BANDS), axis_types=(auto, auto))


def check_mesh(mesh: Any) -> Mesh:
    """Returns ``mesh`` if it has a ``"batch"`` axis (and optionally ``"bands"``), or raises."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh; received {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if BATCH not in names or not set(names) <= {BATCH, BANDS}:
        raise ValueError(
            f"mesh: expected the axes ('batch',) or ('batch', 'bands'); received {names}"
        )
    explicit = [
        name
        for name, kind in zip(names, mesh.axis_types, strict=True)
        if kind != jax.sharding.AxisType.Auto
    ]
    if explicit:
        raise ValueError(
            f"mesh: expected Auto axis types (as make_mesh builds); the axes {explicit} "
            f"are not Auto"
        )
    return mesh


def data_spec(mesh: Mesh) -> PartitionSpec:
    """Splits ``[batch, bands, ...]`` arrays on ``"batch"`` (and ``"bands"``)."""
    return PartitionSpec(BATCH, BANDS) if BANDS in mesh.axis_names else PartitionSpec(BATCH)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, data_spec(mesh))


def key_sharding(mesh: Mesh) -> NamedSharding:
    """Splits per-entry keys ``[batch]`` on ``"batch"``."""
    return NamedSharding(mesh, PartitionSpec(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(mesh: Mesh, batch: int, bands: int) -> None:
    """Raises if the batch (or bands) cannot be split evenly over the mesh."""
    for name, size in ((BATCH, batch), (BANDS, bands)):
        devices = dict(mesh.shape).get(name, 1)
        if size % devices:
            raise ValueError(
                f"inputs: the {name} axis ({size}) must be divisible by the mesh's "
                f"'{name}' axis ({devices} devices)"
            )


# -- several processes ------------------------------------------------------------------


@functools.cache  # asked on every training step; a mesh's devices never change
def spans_processes(mesh: Mesh) -> bool:
    """Whether ``mesh`` holds devices of other processes (``jax.distributed``)."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Every leaf of ``tree`` as a ``jax.Array`` laid out by ``sharding``.

    Within one process this is ``jax.device_put``. Across processes a value
    must reach devices this process cannot address, so each process gives the
    whole value (NumPy, or an array of its own devices, e.g. fresh parameters
    or a typed key): every process must pass the same values, and each keeps
    the shards of its own devices. Leaves already laid out so are kept.
    """
    if not spans_processes(sharding.mesh):
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _place_leaf(leaf, sharding), tree)


def _keys_as_data(one: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``one``, a function of one array leaf, taking typed keys through their
    key data (which has a NumPy form) and wrapping the result back as keys."""

    def through_data(leaf: Any, *args: Any) -> Any:
        if not _validate.is_typed_key(leaf):
            return one(leaf, *args)
        data = one(jax.random.key_data(leaf), *args)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))

    return through_data


def check_same_on_every_process(named: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the first argument of ``named`` whose host
    values (NumPy arrays, or arrays of this process's devices) differ between
    the processes: :func:`place` takes each for the whole global value, so a
    process passing only its own rows would train on something else, silently.

    Every process calls it with the same names (it gathers one CRC-32 per
    name from all of them); global arrays, which hold each process's part
    already, are not read, and nothing is gathered when no leaf is on the host.
    """
    checksums, host = [], False
    for tree in named.values():
        crc = 0
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                continue
            if _validate.is_typed_key(leaf):
                leaf = jax.random.key_data(leaf)
            array = np.ascontiguousarray(np.asarray(leaf))
            crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode(), crc)
            crc = zlib.crc32(array.view(np.uint8), crc)
            host = True
        checksums.append(crc)
    if not host:
        return
    mine = np.array(checksums, np.uint32).view(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(checksums))
    for column, name in enumerate(named):
        if len(set(every[:, column].tolist())) > 1:
            raise ValueError(
                f"{name}: the processes passed different values (CRC-32 per process: "
                f"{every[:, column].view(np.uint32).tolist()}); with a mesh over several "
                "processes every process passes the whole global batch (the same NumPy "
                "arrays), or global arrays made from its own rows by "
                "banded_rnn.training.global_batch(mesh, rows)"
            )


@_keys_as_data
def _place_leaf(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return leaf  # already global: the jitted step checks its layout
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def process_rows(mesh: Mesh, batch: int) -> slice:
    """The batch rows ``[start, stop)`` whose data this process's devices hold
    under :func:`data_sharding`; or ``ValueError`` unless they are whole rows
    (every band), one contiguous block held by no other process."""
    shape = (batch, dict(mesh.shape).get(BANDS, 1))
    check_divisible(mesh, *shape)
    mine, others = set(), set()
    for device, index in data_sharding(mesh).devices_indices_map(shape).items():
        rows = range(batch)[index[0]]
        (mine if device.process_index == jax.process_index() else others).update(rows)
    if not mine:
        raise ValueError("mesh: expected some of this process's devices; it holds none of them")
    start, stop = min(mine), max(mine) + 1
    if mine & others or len(mine) != stop - start:
        raise ValueError(
            "mesh: expected each process's devices to hold whole batch rows, one block of "
            "them; split bands only over the devices of one process"
        )
    return slice(start, stop)


def global_batch(mesh: Mesh, local: Any, *, split_bands: bool = True) -> Any:
    """The global batch from each process's own rows.

    ``local`` is a pytree of arrays ``[rows, ...]`` holding this process's
    rows of the batch (:class:`ChunkStream` deals them);
    the result has the same structure, every leaf a global ``jax.Array`` of
    ``rows * process_count`` rows split over ``mesh`` as the training step
    splits them: arrays of two or more axes as its inputs, on ``"batch"``
    and ``"bands"`` (on ``"batch"`` alone if not ``split_bands``: per-sequence
    targets, whose second axis need not be the bands); typed keys (one per
    entry) and ``[rows]`` arrays on ``"batch"`` alone. Every process must call
    it, with the same structure and shapes.

    >>> mesh = make_mesh(devices=jax.devices()[:1])    # with one process: all the rows
    >>> inputs, reset = global_batch(mesh, (np.zeros((4, 3, 8, 2)), np.ones(4, bool)))
    >>> inputs.shape, inputs.sharding.spec
    ((4, 3, 8, 2), P('batch', 'bands'))
    """

    @_keys_as_data
    def one(leaf: Any, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    def sharding_of(leaf: Any) -> NamedSharding:  # keys [rows] by their own shape
        return data_sharding(mesh) if split_bands and np.ndim(leaf) >= 2 else key_sharding(mesh)

    return jax.tree.map(lambda leaf: one(leaf, sharding_of(leaf)), local)


def gather_to_host(tree: Any) -> Any:
    """Every leaf of ``tree`` whole on the host: NumPy arrays, typed keys as
    keys on this process's default device. Gathered from every process where
    a leaf is split over several (every process must call it then); a plain
    copy otherwise. Non-array leaves are kept.

    >>> host = gather_to_host({"hidden": jax.numpy.ones((2, 3)), "step": 7})
    >>> type(host["hidden"]).__name__, host["step"]
    ('ndarray', 7)
    """

    @_keys_as_data
    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.is_fully_replicated:
                return np.asarray(leaf.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf) if isinstance(leaf, jax.Array | np.ndarray) else leaf

    return jax.tree.map(one, tree)
