"""Our implementation of every configuration, through the public API only.

"Ours" is ``BandedLSTM``'s default (``implementation="auto"``: the native CPU
kernel), or ``implementation="cudnn"`` on a CUDA GPU; :func:`build_scan` is
the same with the XLA scan.

* full sequence: ``jax.jit(model.apply)``;
* streaming: ``banded_rnn.Stream(..., outputs="device")`` fed device-resident
  frames, as the baselines are (NumPy frames in and out cost a few us more
  per frame, benchmarks/NOTES.md entry 14); :func:`build_step` is the pure
  ``banded_rnn.stream_step(model)`` (the state donated);
* training: one optimiser step (forward, backward, ``optax.adam``, MSE on a
  linear head ``units -> features``): ``banded_rnn.training.make_train_step``
  (the parameters and the optimiser state donated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import PartitionSpec

from banded_rnn import BandedLSTM, Stream, stream_step
from banded_rnn._internal import cudnn_platform_supported
from banded_rnn.training import make_mesh, make_train_step

from ._configs import Config
from ._harness import (
    GRAD_TOLERANCE,
    OURS,
    OURS_SCAN,
    OURS_SHARDED,
    OURS_STEP,
    PARITY_FRAMES,
    Impl,
    compile_seconds,
    jax_stream_impl,
)
from ._weights import Weights, to_ours

LEARNING_RATE = 1e-3


def _model(
    config: Config, remat_chunk: int | None = None, implementation: str = "auto"
) -> BandedLSTM:
    return BandedLSTM(
        units=config.units,
        num_layers=config.layers,
        remat_chunk=remat_chunk,
        implementation=implementation,
    )


def build(
    config: Config,
    weights: Weights,
    inputs: np.ndarray,
    targets: np.ndarray,
    implementation: str | None = None,
) -> Impl:
    """Our :class:`Impl` of ``config`` with ``weights``, on ``inputs`` (and
    ``targets``); by default ``"auto"``, or ``"cudnn"`` on a CUDA GPU."""
    if implementation is None:
        implementation = "cudnn" if cudnn_platform_supported() else "auto"
    if config.mode == "inference":
        return _inference(config, weights, inputs, implementation=implementation)
    if config.mode == "stream":
        return _stream(config, weights, inputs, implementation)
    return _train(config, weights, inputs, targets, implementation=implementation)


def build_scan(config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray) -> Impl:
    """Ours on the XLA scan (:data:`OURS_SCAN`): the path before the kernel,
    and the one other platforms and dtypes take."""
    impl = build(config, weights, inputs, targets, implementation="scan")
    return dataclasses.replace(impl, name=OURS_SCAN, note=f"{impl.note}, implementation='scan'")


SHARDED_CONFIGS = ("seed", "train")
"""Configurations also run with the batch split over the CPU devices: those
with a batch to split whose steps are short enough that one core idles for
much of each step (seed's matmul runs on one core; train's gate maths and
stacked writes do). The sub-band ones measured slower split over two devices
(benchmarks/NOTES.md, entry 7)."""


def build_sharded(
    config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray
) -> Impl | None:
    """Ours with the batch split over every CPU device (:data:`OURS_SHARDED`),
    through ``banded_rnn.training.make_mesh``; None if this process has one
    device or the batch does not divide evenly."""
    devices = jax.devices()
    if config.name not in SHARDED_CONFIGS or len(devices) < 2 or config.batch % len(devices):
        return None
    mesh = make_mesh()
    where = f"batch split over {len(devices)} CPU devices (make_mesh)"
    if config.mode == "inference":
        impl = _inference(config, weights, inputs, mesh)
        where += ", traced under jax.set_mesh"
    else:
        impl = _train(config, weights, inputs, targets, mesh)
    return dataclasses.replace(impl, name=OURS_SHARDED, note=f"{impl.note}, {where}")


def _inference(
    config: Config,
    weights: Weights,
    inputs: np.ndarray,
    mesh: jax.sharding.Mesh | None = None,
    implementation: str = "auto",
) -> Impl:
    model = _model(config, implementation=implementation)
    variables = jax.device_put(to_ours(weights))
    apply = jax.jit(model.apply)
    if mesh is None:
        x, under_mesh = jax.device_put(inputs), contextlib.nullcontext
    else:  # the batch split, traced under the mesh: the kernel runs each device's rows
        x = jax.device_put(inputs, jax.sharding.NamedSharding(mesh, PartitionSpec("batch")))
        under_mesh = partial(jax.set_mesh, mesh)

    def call():
        with under_mesh():
            return apply(variables, None, x)

    with under_mesh():
        compile_s = compile_seconds(apply, variables, None, x)
    return Impl(
        OURS,
        lambda: {"outputs": call()[1]},
        lambda: jax.block_until_ready(call()),
        compile_seconds=compile_s,
        note="jax.jit(model.apply)",
    )


def _frames(config: Config, inputs: np.ndarray) -> list[jax.Array]:
    return [jnp.asarray(inputs[:, :, t : t + 1]) for t in range(config.frames)]


def _stream(
    config: Config, weights: Weights, inputs: np.ndarray, implementation: str = "auto"
) -> Impl:
    model = _model(config, implementation=implementation)
    start = time.perf_counter()
    stream = Stream(
        model, to_ours(weights), config.batch, config.bands, max_chunk=1, outputs="device"
    )
    stream.warmup()
    compile_s = time.perf_counter() - start
    frames = _frames(config, inputs)

    def outputs():
        stream.reset()
        first = [np.asarray(stream(frame))[:, :, 0] for frame in frames[:PARITY_FRAMES]]
        return {"outputs": np.stack(first)}

    def run():
        for frame in frames:
            stream(frame).block_until_ready()

    note = "banded_rnn.Stream(model, ..., outputs='device'), device-resident frames"
    return Impl(OURS, outputs, run, per_run=len(frames), compile_seconds=compile_s, note=note)


def build_step(
    config: Config, weights: Weights, inputs: np.ndarray, targets: np.ndarray
) -> Impl | None:
    """Streaming through the pure ``stream_step`` (:data:`OURS_STEP`); None
    for the other modes."""
    del targets
    if config.mode != "stream":
        return None
    model = _model(config)
    return jax_stream_impl(
        OURS_STEP,
        stream_step(model),
        jax.device_put(to_ours(weights)),
        lambda: model.initial_state(config.batch, config.bands),
        _frames(config, inputs),
        "banded_rnn.stream_step(model)",
    )


class WithHead(nn.Module):
    """``BandedLSTM`` then a linear head ``units -> features``: the model the
    ``train`` configuration fits, with ``BandedLSTM``'s call signature."""

    units: int
    num_layers: int
    features: int
    remat_chunk: int | None = None
    implementation: str = "auto"

    @nn.compact
    def __call__(self, state, inputs, *, deterministic: bool = True):
        lstm = BandedLSTM(
            units=self.units,
            num_layers=self.num_layers,
            remat_chunk=self.remat_chunk,
            implementation=self.implementation,
            name="lstm",
        )
        state, hidden = lstm(state, inputs, deterministic=deterministic)
        return state, nn.Dense(self.features, name="head")(hidden)


def _mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def train_params(weights: Weights) -> dict:
    """``WithHead``'s params: ``{"lstm": {"layer_{i}": ...}, "head": {kernel, bias}}``."""
    kernel, bias = weights.head
    return {"lstm": to_ours(weights)["params"], "head": {"kernel": kernel, "bias": bias}}


class TrainRunner:
    """One training step of ``WithHead`` with ``optax.adam``, from
    ``banded_rnn.training.make_train_step``; the parameters and the optimiser
    state are donated.

    ``carry`` holds what the step updates; ``step(carry, x, y) -> (carry,
    loss)``; ``lower(carry, x, y)`` lowers it (carry and data may be shapes);
    ``step_grad_norm(carry, x, y)`` is the norm of the gradient the step
    applies; ``loss_and_grad(params, x, y)`` is the jitted loss and gradient.
    """

    note = "banded_rnn.training.make_train_step(mse) on BandedLSTM + Dense head, optax.adam"

    def __init__(
        self,
        config: Config,
        remat_chunk: int | None = None,
        mesh=None,
        implementation: str = "auto",
    ):
        self.module = WithHead(
            config.units, config.layers, config.features, remat_chunk, implementation
        )
        self.optimizer = optax.adam(LEARNING_RATE)

        def loss(params, inputs, targets):
            _, outputs = self.module.apply({"params": params}, None, inputs)
            return _mse(outputs, targets)

        self.loss_and_grad = jax.jit(jax.value_and_grad(loss))
        self._step = make_train_step(_mse, mesh=mesh)

    def lower(self, carry, x, y):
        return self._step.lower(carry, None, x, y)

    def step(self, carry, x, y):
        carry, _, metrics = self._step(carry, None, x, y)
        return carry, metrics["loss"]

    def step_grad_norm(self, carry, x, y):
        return self._step(carry, None, x, y)[2]["grad_norm"]

    def carry(self, params) -> TrainState:
        """The step's initial carry from ``params`` (made of fresh buffers)."""
        params = jax.tree_util.tree_map(jnp.array, params)
        return TrainState.create(apply_fn=self.module.apply, params=params, tx=self.optimizer)


def _train(
    config: Config,
    weights: Weights,
    inputs: np.ndarray,
    targets: np.ndarray,
    mesh=None,
    implementation: str = "auto",
) -> Impl:
    runner = TrainRunner(config, mesh=mesh, implementation=implementation)
    split = None
    if mesh is not None:
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    x, y = jax.device_put(inputs, split), jax.device_put(targets, split)
    params = jax.device_put(train_params(weights))
    held = [runner.carry(params)]
    start = time.perf_counter()
    runner.lower(held[0], x, y).compile()
    compile_s = time.perf_counter() - start

    def outputs():
        loss, grads = runner.loss_and_grad(params, x, y)
        _, step_loss = runner.step(runner.carry(params), x, y)
        # The timed step reports the norm of the gradient it applied: with the
        # batch split over devices, a wrong reduction of the gradient shows here.
        applied = float(runner.step_grad_norm(runner.carry(params), x, y))
        checked = float(optax.tree.norm(grads))
        if abs(applied - checked) > GRAD_TOLERANCE * checked:
            raise AssertionError(
                f"the step applied a gradient of norm {applied:.6g}; "
                f"the checked gradient has norm {checked:.6g}"
            )
        flat = {"loss": loss, "step_loss": step_loss}
        flat["head/kernel"], flat["head/bias"] = grads["head"]["kernel"], grads["head"]["bias"]
        for layer, leaves in grads["lstm"].items():
            for name, grad in leaves.items():
                flat[f"{layer}/{name}"] = grad
        return flat

    def run():
        held[0], loss = runner.step(held[0], x, y)
        loss.block_until_ready()

    return Impl(OURS, outputs, run, compile_seconds=compile_s, note=runner.note)


def train_memory(
    config: Config, weights: Weights, steps: int, remat_chunk: int | None
) -> dict[str, int]:
    """Compiled memory of our training step on ``steps`` time steps: the byte sizes
    of XLA's temporaries, arguments and outputs, and their sum (``peak``)."""
    runner = TrainRunner(config, remat_chunk)
    shape = jax.ShapeDtypeStruct((config.batch, config.bands, steps, config.features), jnp.float32)
    params = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), train_params(weights)
    )
    carry = jax.eval_shape(runner.carry, params)
    stats = runner.lower(carry, shape, shape).compile().memory_analysis()
    sizes = {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    sizes["peak"] = sizes["temp"] + sizes["argument"] + sizes["output"]
    return sizes
