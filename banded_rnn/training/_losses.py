"""Losses and metrics that skip what does not count: padding, or the labels of
sequences that end in another window."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._targets import masked_sum

PerTarget = Callable[[Any, Any], jax.Array]


def masked_mean(per_target: PerTarget) -> Callable[..., jax.Array]:
    """``loss_fn(outputs, targets, mask=None)``: the mean of
    ``per_target(outputs, targets)`` over the targets ``mask`` keeps.

    ``per_target`` returns one value per target element (``optax.l2_loss``,
    ``optax.softmax_cross_entropy_with_integer_labels``, ...), an array whose
    shape starts with the mask's: ``[batch, bands, time]`` for targets per
    step, ``[batch]`` for targets per sequence (the masks the training and
    evaluation steps pass). Values where the mask is false are left out,
    NaN included, so padded steps never count; a window where nothing counts
    has loss 0 (and gradient 0). Without a mask, the plain mean.

    >>> import numpy as np, optax
    >>> loss_fn = masked_mean(optax.l2_loss)
    >>> outputs = jnp.ones((1, 1, 3, 2))               # [batch, bands, time, units]
    >>> targets = jnp.zeros((1, 1, 3, 2)).at[0, 0, 2].set(9.0)   # the last step is padding
    >>> float(loss_fn(outputs, targets, np.array([[[True, True, False]]])))
    0.5
    """

    def loss_fn(outputs: Any, targets: Any, mask: Any = None) -> jax.Array:
        values = jnp.asarray(per_target(outputs, targets))
        if mask is None:
            return jnp.mean(values)
        total, count = masked_sum(values, jnp.asarray(mask))
        return total / jnp.maximum(count, 1.0)

    return loss_fn


def accuracy(outputs: Any, targets: Any) -> jax.Array:
    """Per target, 1.0 where ``argmax(outputs, -1)`` is the class index in
    ``targets`` (``outputs [..., classes]``, integer ``targets [...]``), else 0.0:
    a metric for :func:`make_eval_step` and :func:`fit`.

    >>> accuracy(jnp.array([[0.1, 2.0], [3.0, 0.0]]), jnp.array([1, 1]))
    Array([1., 0.], dtype=float32)
    """
    return (jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32)
