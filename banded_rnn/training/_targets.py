"""Which targets count, and the loss over them: the valid steps of a window
(``seq_lengths`` or ``mask``), one label per sequence (``ends``), and masked
sums."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._internal import validate as _validate

TARGETS_PER = ("step", "sequence")
"""What a target belongs to: each time step, or each sequence (from its final state)."""

EXTRAS = ("seq_lengths", "mask", "ends")
"""The optional keyword arrays of a step's call, in this order."""


def step_keywords(seq_lengths: Any, mask: Any) -> dict[str, Any]:
    """The model's keyword arguments for the valid steps: ``{"seq_lengths":
    ...}``, ``{"mask": ...}`` or ``{}``."""
    if seq_lengths is not None:
        return {"seq_lengths": seq_lengths}
    return {} if mask is None else {"mask": mask}


def given_extras(extras: tuple[Any, Any, Any]) -> dict[str, Any]:
    """``extras`` (:data:`EXTRAS` in order) as the keyword arguments of those
    that are given, so that a step lowered without them is called without them."""
    return {name: value for name, value in zip(EXTRAS, extras, strict=True) if value is not None}


def loss_mask(
    targets_per: str, valid_steps: dict[str, Any], ends: Any, batch: int, bands: int, time: int
) -> jax.Array | None:
    """The targets that count, for the loss and the metrics: per step,
    ``[batch, bands, time]`` bools from ``valid_steps`` (:func:`step_keywords`);
    per sequence, ``ends [batch]``; None when all of them count."""
    if targets_per == "sequence":
        return ends
    if "seq_lengths" in valid_steps:
        lengths = _validate.check_seq_lengths(valid_steps["seq_lengths"], batch, bands, time)
        return jnp.arange(time)[None, None, :] < lengths[..., None]
    if "mask" in valid_steps:
        return _validate.check_mask(valid_steps["mask"], batch, bands, time)
    return None


def call_loss(loss_fn: Callable[..., Any], outputs: Any, targets: Any, mask: Any) -> jax.Array:
    """``loss_fn(outputs, targets)``, or with ``mask`` when some targets do not count."""
    return loss_fn(outputs, targets) if mask is None else loss_fn(outputs, targets, mask)


def takes_mask(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn(outputs, targets, mask)`` is a valid call."""
    try:
        inspect.signature(loss_fn).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): let the call decide
        return True
    return True


def masked_sum(values: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The sum of ``values [mask.shape..., ...]`` where ``mask`` holds, and
    how many entries of ``mask`` hold (all of its shape's, for None)."""
    if mask is None:
        return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
    weights = _broadcast_mask(mask, values)
    return jnp.sum(jnp.where(weights, values, 0)), jnp.sum(weights, dtype=jnp.float32)


def _broadcast_mask(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``mask``, a prefix of ``values``' shape, broadcast to it."""
    if tuple(values.shape[: mask.ndim]) != tuple(mask.shape):
        raise ValueError(
            f"mask: expected a prefix of the values' shape {tuple(values.shape)}; "
            f"received {tuple(mask.shape)}"
        )
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return jnp.broadcast_to(mask, values.shape)
