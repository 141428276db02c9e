"""Training on a mesh of four CPU devices equals training on one
(tests/training/test_training_sharding.py): the step on meshes of the batch
axis and of batch and bands, with one key or one per entry; fit; fit on
padded data, in chunks and in buckets with held-out metrics; a batch the mesh
cannot split is refused. Prints a line for each check that passed.

Run with four CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``),
set before JAX starts: so in a process of its own.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import PartitionSpec

from banded_rnn import BandedLSTM
from banded_rnn.training import (
    ChunkStream,
    accuracy,
    fit,
    make_mesh,
    make_train_step,
    masked_mean,
)

from helpers import init_model

jax.config.update("jax_numpy_rank_promotion", "raise")
assert len(jax.devices()) == 4, jax.devices()
batch, bands, time, features, units = 4, 2, 6, 3, 4
model = BandedLSTM(units, num_layers=2, dropout=0.2, recurrent_dropout=0.2)
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, bands, time, features)).astype(np.float32)
y = rng.standard_normal((batch, bands, time, units)).astype(np.float32)
variables = init_model(model, x)
tx = optax.adam(1e-2)


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def new_train_state():
    params = jax.tree.map(jnp.array, variables["params"])
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def train(mesh, keys):
    step = make_train_step(mse, mesh=mesh, chunk_length=4)
    train_state, state, losses = new_train_state(), model.initial_state(batch, bands), []
    for _ in range(3):
        train_state, state, metrics = step(train_state, state, x, y, keys)
        losses.append(metrics["loss"])
    return train_state, state, losses


def assert_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-5)


meshes = {  # a mesh of the batch axis alone, and make_mesh's ("batch", "bands") grid
    "batch": jax.sharding.Mesh(np.array(jax.devices()), ("batch",)),
    "batch_bands": make_mesh(bands=2),
}
assert dict(meshes["batch_bands"].shape) == {"batch": 2, "bands": 2}
keyings = {"one": jax.random.key(1), "per_entry": jax.random.split(jax.random.key(1), batch)}
for keying, keys in keyings.items():
    single = train(None, keys)
    assert all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(single[0].params))
    for name, mesh in meshes.items():
        sharded = train(mesh, keys)
        assert_close(sharded[0].params, single[0].params)
        assert_close(sharded[0].opt_state, single[0].opt_state)
        assert_close(sharded[1], single[1])
        assert_close(sharded[2], single[2])
        # really spread over the four devices: state split, parameters replicated
        spec = PartitionSpec(*mesh.axis_names)
        for leaf in jax.tree.leaves(sharded[1]):
            assert leaf.sharding.spec == spec and len(leaf.sharding.device_set) == 4
            assert len(leaf.addressable_shards) == 4
            assert leaf.addressable_shards[0].data.shape[0] < batch
        for leaf in jax.tree.leaves(sharded[0].params):
            assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
        print("equal", keying, name)

# The loop on a mesh: per-entry resets and keys, same losses as on one device.
lengths = [8, 4, 12, 8, 4, 16]
inputs = [rng.standard_normal((bands, t, features)).astype(np.float32) for t in lengths]
targets = [rng.standard_normal((bands, t, units)).astype(np.float32) for t in lengths]
histories = []
for mesh in (None, meshes["batch_bands"]):
    chunks = ChunkStream(inputs, targets, batch_size=batch, chunk_length=4, seed=3)
    result = fit(
        make_train_step(mse, mesh=mesh),
        new_train_state(),
        chunks,
        num_steps=6,
        rng=jax.random.key(2),
        progress=False,
    )
    histories.append(result.history["loss"])
np.testing.assert_allclose(histories[1], histories[0], rtol=0, atol=1e-5)
print("equal fit")

# Padded data on a mesh: chunks of sequences of any lengths (per-step
# targets), and whole sequences in buckets with one label each, held-out
# metrics included; the same histories as on one device.


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, state, inputs, *, seq_lengths=None, deterministic=True):
        state, _ = BandedLSTM(units)(state, inputs, seq_lengths=seq_lengths)
        return state, nn.Dense(3)(state[-1].hidden.mean(axis=1))


lengths = [5, 3, 9, 7, 2, 6, 11]
inputs = [rng.standard_normal((bands, t, features)).astype(np.float32) for t in lengths]
targets = [rng.standard_normal((bands, t, units)).astype(np.float32) for t in lengths]
labels = rng.integers(0, 3, len(lengths))
classifier = Classifier()
head_params = init_model(classifier, x)["params"]
cross_entropy = masked_mean(optax.softmax_cross_entropy_with_integer_labels)
masked_mse = masked_mean(lambda outputs, targets: (outputs - targets) ** 2)
runs = {"chunks": [], "buckets": []}
for mesh in (None, meshes["batch_bands"]):
    chunks = ChunkStream(inputs, targets, batch_size=batch, chunk_length=4, seed=3)
    result = fit(
        make_train_step(masked_mse, mesh=mesh),
        new_train_state(),
        chunks,
        num_steps=5,
        rng=jax.random.key(2),
        progress=False,
        eval_data=(inputs[:5], targets[:5]),
    )
    runs["chunks"].append(result.history)
    fresh = jax.tree.map(jnp.array, head_params)  # the step donates its buffers
    start = TrainState.create(apply_fn=classifier.apply, params=fresh, tx=tx)
    buckets = ChunkStream(
        inputs, labels, batch_size=batch, targets_per="sequence", buckets=[6, 11], seed=1
    )
    step = make_train_step(cross_entropy, mesh=mesh, targets_per="sequence")
    result = fit(
        step,
        start,
        buckets,
        num_steps=4,
        rng=jax.random.key(2),
        progress=False,
        eval_data=(inputs, labels),
        metrics={"accuracy": accuracy},
    )
    runs["buckets"].append(result.history)
for name, (one, split) in runs.items():
    for key in ("loss", "eval_loss", "eval_accuracy"):
        if key in one:
            np.testing.assert_allclose(split[key], one[key], rtol=0, atol=1e-5)
    print("equal padded", name)

try:
    make_train_step(mse, mesh=make_mesh())(new_train_state(), None, x[:2], y[:2], jax.random.key(1))
except ValueError as error:
    assert "batch axis (2) must be divisible by the mesh's 'batch' axis (4" in str(error)
    print("refused", error)
else:
    raise AssertionError("a batch of 2 on 4 devices was accepted")
