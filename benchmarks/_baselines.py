"""The baselines, written the way a user of each framework would write them.

* ``torch``: ``torch.nn.LSTM`` (``batch_first``), bands folded into the batch,
  2 threads, under ``torch.inference_mode`` for inference; training with
  ``torch.optim.Adam`` and ``nn.Linear`` as the head.
* ``keras``: ``keras.layers.LSTM`` (one per layer) on the JAX backend, bands
  folded into the batch, jitted through ``stateless_call``; training with
  ``jax.value_and_grad`` and ``optax.adam``.
* ``flax``: ``flax.linen.RNN(OptimizedLSTMCell)`` per layer, directly on
  ``[batch, bands, time, features]`` (its extra batch axes are the bands), the
  cell applied per frame when streaming; training like ``keras``.

torch and keras are imported when a baseline is built, never at import time.
"""

from __future__ import annotations

import os
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._configs import Config
from ._harness import PARITY_FRAMES, Impl, compile_seconds, jax_stream_impl
from ._ours import LEARNING_RATE
from ._weights import (
    Weights,
    check_same_tree,
    from_flax_cell,
    load_torch,
    to_flax_cell,
    torch_grads,
)

TORCH_THREADS = 2

BUILDERS = {}


def _builder(name):
    def register(fn):
        BUILDERS[name] = fn
        return fn

    return register


def _stream_frames(config: Config, inputs: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(inputs[:, :, t : t + 1]) for t in range(config.frames)]


def _flat_grads(layer_grads, head_grads) -> dict[str, np.ndarray]:
    flat = {}
    for i, (k, r, b) in enumerate(layer_grads):
        flat[f"layer_{i}/kernel"] = k
        flat[f"layer_{i}/recurrent_kernel"] = r
        flat[f"layer_{i}/bias"] = b
    flat["head/kernel"], flat["head/bias"] = head_grads
    return flat


# --- torch -------------------------------------------------------------------------


@_builder("torch")
def build_torch(config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray) -> Impl:
    """``torch.nn.LSTM`` with the bands folded into the batch."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    rows, units = config.rows, config.units

    def modules():
        lstm = torch.nn.LSTM(config.features, units, num_layers=config.layers, batch_first=True)
        linear = torch.nn.Linear(units, config.features) if config.mode == "train" else None
        load_torch(lstm, weights, linear)
        return lstm, linear

    lstm, linear = modules()
    x = torch.from_numpy(inputs)

    if config.mode == "inference":

        def forward():
            with torch.inference_mode():
                y, _ = lstm(x.reshape(rows, config.time, config.features))
                return y.reshape(config.batch, config.bands, config.time, units)

        return Impl(
            "torch",
            lambda: {"outputs": forward().numpy()},
            forward,
            uses_jax=False,
            note=f"torch.nn.LSTM, bands folded, inference_mode, {TORCH_THREADS} threads",
        )

    if config.mode == "stream":
        frames = [torch.from_numpy(f) for f in _stream_frames(config, inputs)]

        def zeros():
            return (
                torch.zeros(config.layers, rows, units),
                torch.zeros(config.layers, rows, units),
            )

        state = [zeros()]

        def step(frame, carried):
            y, carried = lstm(frame.reshape(rows, 1, config.features), carried)
            return y.reshape(config.batch, config.bands, 1, units), carried

        def outputs():
            carried, ys = zeros(), []
            with torch.inference_mode():
                for frame in frames[:PARITY_FRAMES]:
                    y, carried = step(frame, carried)
                    ys.append(y[:, :, 0].numpy())
            return {"outputs": np.stack(ys)}

        def run():
            carried = state[0]
            with torch.inference_mode():
                for frame in frames:
                    y, carried = step(frame, carried)
            state[0] = carried

        return Impl(
            "torch",
            outputs,
            run,
            per_run=config.frames,
            uses_jax=False,
            note=f"torch.nn.LSTM, one frame per call with (h, c), inference_mode, "
            f"{TORCH_THREADS} threads",
        )

    y_target = torch.from_numpy(targets)

    def loss_of(lstm, linear):
        hidden, _ = lstm(x.reshape(rows, config.time, config.features))
        prediction = linear(hidden).reshape(y_target.shape)
        return torch.nn.functional.mse_loss(prediction, y_target)

    def adam(lstm, linear):
        return torch.optim.Adam([*lstm.parameters(), *linear.parameters()], lr=LEARNING_RATE)

    def step(lstm, linear, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(lstm, linear)
        loss.backward()
        optimizer.step()
        return loss

    def outputs():
        lstm, linear = modules()
        loss = loss_of(lstm, linear)
        loss.backward()
        grads = torch_grads(lstm, config.layers, linear)
        fresh = modules()
        step_loss = step(*fresh, adam(*fresh))
        return {"loss": loss.detach().numpy(), "step_loss": step_loss.detach().numpy(), **grads}

    optimizer = adam(lstm, linear)

    def run():
        step(lstm, linear, optimizer)

    return Impl(
        "torch",
        outputs,
        run,
        uses_jax=False,
        note=f"torch.nn.LSTM + nn.Linear, bands folded, torch.optim.Adam, {TORCH_THREADS} threads",
    )


# --- keras -------------------------------------------------------------------------


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"keras: expected the JAX backend (set KERAS_BACKEND=jax before importing keras); "
            f"received {keras.backend.backend()!r}"
        )
    return keras


def _keras_values(layer) -> tuple[list, list]:
    return (
        [jnp.asarray(v.value) for v in layer.trainable_variables],
        [jnp.asarray(v.value) for v in layer.non_trainable_variables],
    )


@_builder("keras")
def build_keras(config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray) -> Impl:
    """``keras.layers.LSTM`` on JAX, bands folded into the batch, via ``stateless_call``."""
    keras = _import_keras()
    rows, units, stream = config.rows, config.units, config.mode == "stream"
    layers = []
    for i, layer_weights in enumerate(weights.layers):
        layer = keras.layers.LSTM(units, return_sequences=True, return_state=stream)
        layer.build((rows, config.time, config.layer_inputs(i)))
        layer.set_weights(list(layer_weights))
        layers.append(layer)
    values = [_keras_values(layer) for layer in layers]
    trainable = [v[0] for v in values]
    non_trainable = [v[1] for v in values]

    def stack(trainable, x, states=None):
        """``x [batch, bands, time, features]`` through every layer; returns
        ``(outputs, new_states)`` (states only when streaming)."""
        batch, bands, time, features = x.shape
        h = x.reshape(batch * bands, time, features)
        new_states = []
        for n, layer in enumerate(layers):
            if stream:
                (h, *state), _ = layer.stateless_call(
                    trainable[n], non_trainable[n], h, initial_state=list(states[n])
                )
                new_states.append(tuple(state))
            else:
                h, _ = layer.stateless_call(trainable[n], non_trainable[n], h)
        return h.reshape(batch, bands, time, units), new_states

    if config.mode == "inference":
        apply = jax.jit(lambda trainable, x: stack(trainable, x)[0])
        x = jnp.asarray(inputs)
        return Impl(
            "keras",
            lambda: {"outputs": apply(trainable, x)},
            lambda: apply(trainable, x).block_until_ready(),
            compile_seconds=compile_seconds(apply, trainable, x),
            note="keras.layers.LSTM (JAX backend), bands folded, jax.jit(stateless_call)",
        )

    if config.mode == "stream":
        step = jax.jit(lambda trainable, states, x: stack(trainable, x, states)[::-1])
        frames = [jnp.asarray(f) for f in _stream_frames(config, inputs)]

        def zeros():
            zero = jnp.zeros((rows, units), jnp.float32)
            return [(zero, zero) for _ in layers]

        return jax_stream_impl(
            "keras",
            step,
            trainable,
            zeros,
            frames,
            "keras.layers.LSTM (JAX backend, return_state, initial_state), bands folded, "
            "one frame per jax.jit(stateless_call)",
        )

    dense = keras.layers.Dense(config.features)
    dense.build((rows, config.time, units))
    dense.set_weights(list(weights.head))
    dense_trainable, dense_non_trainable = _keras_values(dense)

    def loss(params, x, y):
        hidden, _ = stack(params[0], x)
        prediction, _ = dense.stateless_call(params[1], dense_non_trainable, hidden)
        return jnp.mean((prediction - y) ** 2)

    return _jax_train_impl(
        "keras",
        loss,
        (trainable, dense_trainable),
        inputs,
        targets,
        lambda grads: _flat_grads([tuple(g) for g in grads[0]], tuple(grads[1])),
        note="keras.layers.LSTM + Dense (JAX backend), bands folded, stateless_call, "
        "jax.value_and_grad, optax.adam, jitted",
    )


def _jax_train_impl(name, loss, params, inputs, targets, canonical, note) -> Impl:
    """A jitted training step (value_and_grad, optax.adam, donated state) over ``loss``."""
    optimizer = optax.adam(LEARNING_RATE)
    loss_and_grad = jax.jit(jax.value_and_grad(loss))

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    x, y = jnp.asarray(inputs), jnp.asarray(targets)
    params = jax.device_put(params)
    opt_state = optimizer.init(params)
    compile_s = compile_seconds(step, params, opt_state, x, y)
    held = [jax.tree_util.tree_map(jnp.copy, params), jax.tree_util.tree_map(jnp.copy, opt_state)]

    def outputs():
        value, grads = loss_and_grad(params, x, y)
        grads = jax.tree_util.tree_map(np.asarray, grads)
        fresh = jax.tree_util.tree_map(jnp.array, params)
        _, _, step_loss = step(fresh, optimizer.init(fresh), x, y)
        return {"loss": value, "step_loss": step_loss, **canonical(grads)}

    def run():
        held[0], held[1], value = step(held[0], held[1], x, y)
        value.block_until_ready()

    return Impl(name, outputs, run, compile_seconds=compile_s, note=note)


# --- flax --------------------------------------------------------------------------


class _FlaxStack(nn.Module):
    """``nn.RNN(nn.OptimizedLSTMCell)`` per layer, then an optional ``nn.Dense`` head."""

    units: int
    num_layers: int
    head_features: int | None = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            # Flax binds a cell made here to this module: its params sit at cell_{i}.
            x = nn.RNN(nn.OptimizedLSTMCell(self.units, name=f"cell_{i}"))(x)
        if self.head_features is not None:
            x = nn.Dense(self.head_features, name="head")(x)
        return x


@_builder("flax")
def build_flax(config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray) -> Impl:
    """The straightforward Flax version: ``nn.RNN(OptimizedLSTMCell)`` per layer."""
    units = config.units
    cell_params = [to_flax_cell(layer) for layer in weights.layers]

    if config.mode == "stream":
        cell = nn.OptimizedLSTMCell(units)
        for i, params in enumerate(cell_params):
            x0 = jnp.zeros((1, config.layer_inputs(i)))
            layout = cell.init(
                jax.random.key(0), cell.initialize_carry(jax.random.key(0), x0.shape), x0
            )
            check_same_tree(layout["params"], params, f"flax layer {i}")
        cell_params = jax.device_put(cell_params)

        @jax.jit
        def step(params, carries, frame):
            x = frame[:, :, 0]
            new_carries = []
            for p, carry in zip(params, carries, strict=True):
                carry, x = cell.apply({"params": p}, carry, x)
                new_carries.append(carry)
            return new_carries, x[:, :, None]

        frames = [jnp.asarray(f) for f in _stream_frames(config, inputs)]

        def zeros():
            zero = jnp.zeros((config.batch, config.bands, units), jnp.float32)
            return [(zero, zero) for _ in range(config.layers)]

        return jax_stream_impl(
            "flax",
            step,
            cell_params,
            zeros,
            frames,
            "nn.OptimizedLSTMCell per layer, one frame per jitted call",
        )

    train = config.mode == "train"
    module = _FlaxStack(units, config.layers, config.features if train else None)
    x = jnp.asarray(inputs)
    params = {f"cell_{i}": p for i, p in enumerate(cell_params)}
    if train:
        params["head"] = {"kernel": weights.head[0], "bias": weights.head[1]}
    layout = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    check_same_tree(layout, params, "flax")
    params = jax.device_put(params)

    if config.mode == "inference":
        apply = jax.jit(module.apply)
        variables = {"params": params}
        return Impl(
            "flax",
            lambda: {"outputs": apply(variables, x)},
            lambda: apply(variables, x).block_until_ready(),
            compile_seconds=compile_seconds(apply, variables, x),
            note="nn.RNN(nn.OptimizedLSTMCell) per layer on [batch, bands, time, features], jitted",
        )

    def loss(params, x, y):
        return jnp.mean((module.apply({"params": params}, x) - y) ** 2)

    def canonical(grads):
        layers = [from_flax_cell(grads[f"cell_{i}"]) for i in range(config.layers)]
        return _flat_grads(layers, (grads["head"]["kernel"], grads["head"]["bias"]))

    return _jax_train_impl(
        "flax",
        loss,
        params,
        inputs,
        targets,
        canonical,
        note="nn.RNN(nn.OptimizedLSTMCell) + nn.Dense, jax.value_and_grad, optax.adam, jitted",
    )
