"""Device meshes for data-parallel training: batch entries (and bands) split over devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import _validate
from .._kernel import ROW_AXES

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
