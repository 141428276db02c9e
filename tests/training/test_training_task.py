"""The task of notebooks/training.ipynb: carrying the state beats resetting it at every chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from banded_rnn.training import ChunkStream, fit, make_train_step

from helpers import WithHead, mse

BANDS, LENGTH, CHUNK, UNITS, BATCH, STEPS = 4, 64, 8, 16, 16, 800


def cue_recall(num_sequences, seed):
    """Every band shows its own cue in [-1, 1] at step 0 and must output it at every
    step: after the first chunk of 8 steps, only a carried state still knows it."""
    rng = np.random.default_rng(seed)
    cue = rng.uniform(-1, 1, (num_sequences, BANDS))
    inputs = np.zeros((num_sequences, BANDS, LENGTH, 2), np.float32)
    inputs[:, :, 0, 0] = cue
    inputs[:, :, 0, 1] = 1.0
    inputs[:, :, 1:, 0] = 0.1 * rng.standard_normal((num_sequences, BANDS, LENGTH - 1))
    targets = np.broadcast_to(cue[:, :, None, None], (num_sequences, BANDS, LENGTH, 1))
    return inputs, targets.astype(np.float32)


def test_carried_state_beats_reset_state():
    train_x, train_y = cue_recall(256, seed=0)
    model = WithHead(UNITS)
    variables = model.init(jax.random.key(0), None, train_x[:1, :, :CHUNK])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    step = make_train_step(mse)
    losses = {}
    for carry_state in (True, False):
        params = jax.tree.map(jnp.array, variables["params"])
        train_state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        chunks = ChunkStream(train_x, train_y, batch_size=BATCH, chunk_length=CHUNK, seed=0)
        result = fit(step, train_state, chunks, num_steps=STEPS, rng=jax.random.key(1),
                     carry_state=carry_state, progress=False)  # fmt: skip
        losses[carry_state] = result.history["loss"][-100:].mean()
    # Predicting zero costs the cue's variance, 1/3; the reset model can only fit the
    # first chunk of every sequence, so it stays near 7/8 of that.
    assert losses[False] > 0.25, losses
    assert losses[True] < 0.5 * losses[False], losses
