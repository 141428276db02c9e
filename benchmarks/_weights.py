"""One set of random weights, copied into every implementation's own layout.

The canonical layout is ``keras.layers.LSTM``'s (and ``BandedLSTM``'s), per
layer: ``kernel [in, 4 * units]``, ``recurrent_kernel [units, 4 * units]``,
``bias [4 * units]``, gates ``i, f, g, o``. The training configuration adds a
linear head, ``kernel [units, features]`` and ``bias [features]``.

* PyTorch ``nn.LSTM``: ``weight_ih_l{k} = kernel.T``, ``weight_hh_l{k} =
  recurrent_kernel.T``, ``bias_ih_l{k} = bias``, ``bias_hh_l{k} = 0`` (the
  same gate order); ``nn.Linear``: ``weight = kernel.T``.
* Flax ``OptimizedLSTMCell``: one ``Dense`` per gate and source, named
  ``i{gate}`` (input, no bias) and ``h{gate}`` (hidden, with the bias), gate in
  ``i, f, g, o``; each kernel is the gate's ``units``-wide column block.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._configs import Config

GATES = ("i", "f", "g", "o")
LayerWeights = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Weights:
    """Weights in the canonical (Keras) layout, float32.

    Attributes:
      layers: per layer ``(kernel [in, 4u], recurrent_kernel [u, 4u], bias [4u])``.
      head: ``(kernel [u, features], bias [features])`` of the training head, or None.
    """

    layers: tuple[LayerWeights, ...]
    head: tuple[np.ndarray, np.ndarray] | None = None

    def perturbed(self, scale: float = 1e-3, seed: int = 99) -> Weights:
        """A copy with noise of ``scale`` added to the first layer's kernel."""
        rng = np.random.default_rng(seed)
        kernel, recurrent_kernel, bias = self.layers[0]
        noisy = (kernel + scale * rng.standard_normal(kernel.shape)).astype(np.float32)
        return dataclasses.replace(self, layers=((noisy, recurrent_kernel, bias), *self.layers[1:]))


def random_weights(config: Config, seed: int = 0) -> Weights:
    """Keras-like random weights: Glorot-uniform kernels, orthogonal recurrent
    kernels, random biases around Keras's unit forget bias (so that a wrong gate
    order or bias slice changes the outputs)."""
    rng = np.random.default_rng(seed)
    units = config.units
    layers = []
    for layer in range(config.layers):
        fan_in = config.layer_inputs(layer)
        limit = np.sqrt(6.0 / (fan_in + 4 * units))
        kernel = rng.uniform(-limit, limit, (fan_in, 4 * units))
        q, r = np.linalg.qr(rng.standard_normal((4 * units, units)))
        recurrent_kernel = (q * np.sign(np.diag(r))).T
        bias = 0.2 * rng.standard_normal(4 * units)
        bias[units : 2 * units] += 1.0
        layers.append(tuple(a.astype(np.float32) for a in (kernel, recurrent_kernel, bias)))
    head = None
    if config.mode == "train":
        limit = np.sqrt(6.0 / (units + config.features))
        head = (
            rng.uniform(-limit, limit, (units, config.features)).astype(np.float32),
            (0.1 * rng.standard_normal(config.features)).astype(np.float32),
        )
    return Weights(tuple(layers), head)


def random_data(config: Config, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``: inputs ``[batch, bands, time * frames, features]``
    (every frame of a streaming run), and training targets of the same shape."""
    rng = np.random.default_rng(seed)
    shape = (config.batch, config.bands, config.time * config.frames, config.features)
    inputs = rng.standard_normal(shape).astype(np.float32)
    targets = rng.standard_normal(shape).astype(np.float32)
    return inputs, targets


# --- ours ----------------------------------------------------------------------


def to_ours(weights: Weights) -> dict:
    """Flax variables for ``BandedLSTM``: ``{"params": {"layer_{i}": {...}}}``."""
    return {
        "params": {
            f"layer_{i}": {"kernel": k, "recurrent_kernel": r, "bias": b}
            for i, (k, r, b) in enumerate(weights.layers)
        }
    }


# --- torch ---------------------------------------------------------------------


def load_torch(lstm, weights: Weights, linear=None) -> None:
    """Copies ``weights`` into a ``torch.nn.LSTM`` (and ``nn.Linear`` head) in place."""
    import torch

    with torch.no_grad():
        for i, (k, r, b) in enumerate(weights.layers):
            getattr(lstm, f"weight_ih_l{i}").copy_(torch.from_numpy(k.T.copy()))
            getattr(lstm, f"weight_hh_l{i}").copy_(torch.from_numpy(r.T.copy()))
            getattr(lstm, f"bias_ih_l{i}").copy_(torch.from_numpy(b))
            getattr(lstm, f"bias_hh_l{i}").zero_()
        if linear is not None:
            k, b = weights.head
            linear.weight.copy_(torch.from_numpy(k.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))


def torch_grads(lstm, num_layers: int, linear=None) -> dict[str, np.ndarray]:
    """The gradients held by ``lstm`` (and ``linear``) in the canonical layout.

    With ``bias_hh`` fixed at zero, the canonical bias's gradient is
    ``bias_ih``'s (``bias_hh`` gets the same one)."""
    grads = {}
    for i in range(num_layers):
        grads[f"layer_{i}/kernel"] = getattr(lstm, f"weight_ih_l{i}").grad.numpy().T
        grads[f"layer_{i}/recurrent_kernel"] = getattr(lstm, f"weight_hh_l{i}").grad.numpy().T
        grads[f"layer_{i}/bias"] = getattr(lstm, f"bias_ih_l{i}").grad.numpy()
    if linear is not None:
        grads["head/kernel"] = linear.weight.grad.numpy().T
        grads["head/bias"] = linear.bias.grad.numpy()
    return grads


# --- flax ----------------------------------------------------------------------


def to_flax_cell(layer: LayerWeights) -> dict:
    """One layer as ``OptimizedLSTMCell`` params: ``{"i{g}": {kernel}, "h{g}": {kernel, bias}}``."""
    kernel, recurrent_kernel, bias = layer
    units = recurrent_kernel.shape[0]
    params = {}
    for n, gate in enumerate(GATES):
        block = slice(n * units, (n + 1) * units)
        params[f"i{gate}"] = {"kernel": kernel[:, block]}
        params[f"h{gate}"] = {"kernel": recurrent_kernel[:, block], "bias": bias[block]}
    return params


def from_flax_cell(params: dict) -> LayerWeights:
    """The inverse of :func:`to_flax_cell`."""
    return (
        np.concatenate([np.asarray(params[f"i{g}"]["kernel"]) for g in GATES], axis=-1),
        np.concatenate([np.asarray(params[f"h{g}"]["kernel"]) for g in GATES], axis=-1),
        np.concatenate([np.asarray(params[f"h{g}"]["bias"]) for g in GATES], axis=-1),
    )


def check_same_tree(expected, received, what: str) -> None:
    """Raises if two parameter trees differ in structure or shapes (a layout error)."""
    import jax

    def shapes(tree):
        return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)

    if shapes(expected) != shapes(received):
        raise ValueError(
            f"{what}: the copied parameters do not match the initialised layout; "
            f"expected {shapes(expected)}; received {shapes(received)}"
        )
