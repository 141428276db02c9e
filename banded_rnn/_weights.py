"""One layer's parameters, and its forward weights packed for the native kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._backends import _packed
from ._cell import LayerWeights
from ._init import unit_forget_bias

Initializer = Callable[..., jax.Array]


class LayerParams(nn.Module):
    """Holds one layer's ``kernel [features, 4 * units]``, ``recurrent_kernel
    [units, 4 * units]`` and ``bias [4 * units]``, Keras's layout."""

    units: int
    kernel_init: Initializer
    recurrent_kernel_init: Initializer
    unit_forget_bias: bool
    param_dtype: Any
    use_bias: bool

    @nn.compact
    def __call__(self, features: int) -> LayerWeights:
        """The weights, with zeros for the bias when ``use_bias`` is off (no
        ``bias`` parameter then, as in ``keras.layers.LSTM(use_bias=False)``)."""
        gates = 4 * self.units
        kernel = self.param("kernel", self.kernel_init, (features, gates), self.param_dtype)
        recurrent_kernel = self.param(
            "recurrent_kernel", self.recurrent_kernel_init, (self.units, gates), self.param_dtype
        )
        if not self.use_bias:
            return kernel, recurrent_kernel, jnp.zeros((gates,), self.param_dtype)
        bias = self.param("bias", self._bias_init, (gates,), self.param_dtype)
        return kernel, recurrent_kernel, bias

    def _bias_init(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        del key
        if self.unit_forget_bias:
            return unit_forget_bias(self.units, jnp.zeros)(shape, dtype)
        return jnp.zeros(shape, dtype)


def packed_weights(module: nn.Module, name: str, weights: LayerWeights) -> jax.Array | None:
    """Layer ``name``'s forward weights packed ahead of time, or None.

    Read from :data:`~banded_rnn._backends._packed.PACKED_COLLECTION` of
    ``module`` (a ``BandedLSTM`` in its call) where a ``Stream`` stored them,
    if laid out for the instruction set in use; stored there (and returned)
    inside ``packing()`` with the collection mutable.
    """
    collection = _packed.PACKED_COLLECTION
    if module.has_variable(collection, name):
        packed = module.get_variable(collection, name)
        expected = _packed.packed_shape(weights[0].shape[0], weights[1].shape[0])
        return packed if packed.shape == expected else None
    if _packed.packing_requested() and module.is_mutable_collection(collection):
        packed = _packed.pack_forward(*weights)
        module.put_variable(collection, name, packed)
        return packed
    return None
